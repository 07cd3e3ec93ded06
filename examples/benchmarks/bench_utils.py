"""Shared helpers of the benchmarks: machine info, round-robin timing, reports, checks
of their command-line flags.

Nothing here imports keras_dst or tf_keras, so both `overhead.py` (Keras 3) and
`tfmot_epoch.py` (Keras 2 through tf_keras) can use it.
"""

import datetime
import json
import math
import os
import platform
import statistics
import threading
import time


# -- machine --------------------------------------------------------------------
def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(tf=None, keras=None):
    """Dict of the things a timing depends on (names, versions, date, load)."""
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_1_5_15min": load_average(),
    }
    if tf is not None:
        info["tensorflow"] = tf.__version__
        gpus = []
        for d in tf.config.list_physical_devices("GPU"):
            try:
                details = tf.config.experimental.get_device_details(d)
            except Exception:  # noqa: BLE001 - details are best effort
                details = {}
            gpus.append(details.get("device_name", d.name))
        info["gpus"] = gpus
        info["device"] = gpus[0] if gpus else f"CPU ({info['cpu']}, {info['cpu_cores']} cores)"
    if keras is not None:
        info["keras"] = keras.__version__
    return info


def device_prefix(tf):
    return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"


# -- statistics -----------------------------------------------------------------
def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def median_ci(xs, level=0.95):
    """Distribution-free confidence interval of the median: (lo, hi) or None.

    The order statistics x_(k) <= median <= x_(n+1-k) with the largest k such that
    P(Binomial(n, 1/2) < k) <= (1 - level) / 2, which holds whatever the noise
    distribution (no normality assumed). None when there are too few values for the
    level (n < 6 at 95 %).
    """
    xs = sorted(x for x in xs if x is not None)
    n = len(xs)
    tail = (1.0 - level) / 2.0
    k, below = 0, 0.0  # below = P(Binomial(n, 1/2) < k + 1)
    while k < n // 2:
        below += math.comb(n, k) / 2.0 ** n
        if below > tail:
            break
        k += 1
    return (xs[k - 1], xs[n - k]) if k >= 1 else None


def verdict(x, limit, ci=None):
    """met / MISSED for a ratio whose target is ``<= limit``, judged with its interval.

    'met' when the whole 95 % interval of the median is within the target,
    'MISSED' when all of it is above; when the interval straddles the target the
    measurement cannot decide: the median's side, 'within noise'.
    """
    if ci is None:
        return "met" if x <= limit else "MISSED"
    if ci[1] <= limit:
        return "met"
    if ci[0] > limit:
        return "MISSED"
    return f"{'met' if x <= limit else 'missed'} on the median, within noise"


def ratio_stats(xs, refs):
    """Per-round ratios ``xs[i] / refs[i]``: (median, 95 % interval of the median or None)."""
    ratios = [a / b for a, b in zip(xs, refs) if a is not None and b]
    return median(ratios), median_ci(ratios)


def spread(xs):
    """(min, max) of a list, None when empty."""
    xs = [x for x in xs if x is not None]
    return (min(xs), max(xs)) if xs else None


# -- round-robin epochs ----------------------------------------------------------
def interleaved(items, rounds, start=0):
    """``(round, item)`` pairs of rounds start..rounds-1: every item once per round, the
    order reversed every other round (so that a drift of the machine hits every item
    alike)."""
    for r in range(start, rounds):
        for item in (items if r % 2 == 0 else items[::-1]):
            yield r, item


class Participant:
    """Something that runs one epoch when asked and records its wall time.

    Subclasses implement `start()` (set up; may run the first, untimed, part of
    the work) and `run_epoch()` -> dict with at least ``seconds`` and ``steps``.
    """

    name = "participant"

    def start(self):
        pass

    def run_epoch(self):
        raise NotImplementedError

    def stop(self):
        pass


class KerasFitParticipant(Participant):
    """Runs ``model.fit(..., epochs=n)`` in a thread, one epoch per `run_epoch` call.

    Every variant keeps its own `fit` call (so its compiled step is traced and
    compiled once) while the scheduler interleaves their epochs: `fit` blocks
    in `on_epoch_begin` until the scheduler hands it the turn, and gives the
    turn back in `on_epoch_end`. Only one model trains at a time.

    Args:
      name: label.
      fit: callable(extra_callbacks, epochs) that runs the fit.
      epochs: total epochs the fit will run (= number of `run_epoch` calls).
      iterations: callable returning the optimizer's step counter (python int),
        read at epoch boundaries.
      callback_base: the Keras Callback class (keras or tf_keras).
    """

    def __init__(self, name, fit, epochs, iterations, callback_base):
        self.name = name
        self._fit = fit
        self._epochs = epochs
        self._iterations = iterations
        self._go = threading.Semaphore(0)
        self._done = threading.Semaphore(0)
        self._record = None
        self._error = None
        self._thread = None
        participant = self

        class _Turn(callback_base):
            def on_epoch_begin(self, epoch, logs=None):
                participant._go.acquire()
                participant._record = {"epoch": epoch, "it0": participant._iterations()}
                participant._t0 = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                seconds = time.perf_counter() - participant._t0  # logs are already on host
                participant._record.update(seconds=seconds, it1=participant._iterations())
                participant._record["steps"] = participant._record["it1"] - participant._record["it0"]
                participant._done.release()

        self._callback = _Turn()

    def _main(self):
        try:
            self._fit([self._callback], self._epochs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the scheduler thread
            self._error = e
            self._done.release()

    def start(self):
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()

    def run_epoch(self):
        self._go.release()
        self._done.acquire()
        if self._error is not None:
            raise RuntimeError(f"{self.name}: fit failed") from self._error
        return dict(self._record)

    def stop(self):
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"{self.name}: fit failed") from self._error


def round_robin(participants, rounds, log=print):
    """Runs `rounds` epochs of every participant, interleaved: round r runs epoch r
    of each participant in turn. Returns {name: [record per round]}."""
    records = {p.name: [] for p in participants}
    for p in participants:
        p.start()
    try:
        for r, p in interleaved(participants, rounds):
            rec = p.run_epoch()
            records[p.name].append(rec)
            log(f"  round {r}: {p.name:<22} {rec['seconds']:8.3f} s  "
                f"{rec['steps']} steps  ({1e3 * rec['seconds'] / max(rec['steps'], 1):.2f} ms/step)")
    finally:
        for p in participants:
            p.stop()
    return records


# -- XLA HLO text ---------------------------------------------------------------
def hlo_opcodes(hlo, entry_only=False):
    """Counts the instructions of an HLO module text by opcode.

    Returns ``(counts, custom_call_targets)``: ``{opcode: count}`` and the list of
    the targets of its custom-calls. With ``entry_only`` only the ENTRY
    computation counts: after XLA's optimisations its instructions are the
    kernels a step runs (fusions, dots, convolutions, copies, ...), the fused
    computations being their bodies.
    """
    if entry_only:
        start = hlo.find("\nENTRY")
        hlo = hlo[start:] if start >= 0 else hlo
        end = hlo.find("\n}")
        hlo = hlo[:end] if end >= 0 else hlo
    counts, custom_calls = {}, []
    for line in hlo.splitlines():
        if " = " not in line:
            continue
        rhs = line.split(" = ", 1)[1].strip()
        # "<shape> <opcode>(operands)..." ; the shape may be a tuple "(...)"
        depth, i = 0, 0
        for i, ch in enumerate(rhs):  # noqa: B007 (i is read after the loop)
            if ch in "([{":
                depth += 1
            elif ch in ")]}":
                depth -= 1
            elif ch == " " and depth == 0:
                break
        opcode = rhs[i + 1:].split("(", 1)[0].strip()
        if not opcode:
            continue
        counts[opcode] = counts.get(opcode, 0) + 1
        if opcode == "custom-call":
            custom_calls.append(line.split('custom_call_target="', 1)[-1].split('"', 1)[0])
    return counts, custom_calls


def compiled_step_kernels(tf, model, x, y):
    """The kernels of `model`'s training step as XLA compiles it (noise-free).

    Compiles ``model.train_step`` on the batch ``(x, y)`` with ``jit_compile=True``
    (`tf` is the TensorFlow module; the optimizer must be built) and counts the
    instructions of the optimised HLO's ENTRY computation by opcode: fusions,
    dots, convolutions, copies, ... are the kernels the step runs. Returns
    ``{"kernels": {opcode: count}, "inputs": n}`` (inputs = parameters).
    """
    step = tf.function(lambda x, y: model.train_step((x, y)), jit_compile=True)
    hlo = step.experimental_get_compiler_ir(x, y)(stage="optimized_hlo")
    counts, _ = hlo_opcodes(hlo, entry_only=True)
    inputs = counts.pop("parameter", 0)
    counts.pop("constant", None)
    return {"kernels": dict(sorted(counts.items())), "inputs": inputs}


# -- command line ---------------------------------------------------------------
def output_prefix(prefix, quick, default):
    """File prefix of a run's outputs: --prefix when given, else "quick" for a --quick run
    (so that a smoke run never overwrites a measurement's files), else `default` (a string,
    or a callable returning it, e.g. `lambda: device_prefix(tf)`)."""
    if prefix:
        return prefix
    if quick:
        return "quick"
    return default() if callable(default) else default


def parse_items(values, parse, what):
    """``[parse(v) for v in values]`` for the items of a list flag; ValueError "'v' is not
    <what>" at the first item `parse` refuses (by raising ValueError or TypeError), or when
    the list is empty."""
    if not values:
        raise ValueError(f"no value given; expected {what}")
    out = []
    for v in values:
        try:
            out.append(parse(v))
        except (TypeError, ValueError) as e:
            detail = "; ".join(str(e).split("\n")).strip()
            raise ValueError(f"{v!r} is not {what}" + (f" ({detail})" if detail else "")) from None
    return out


# The parsers below raise a ValueError without a message: `parse_items` names the item and
# what it should be.
def _number(convert, text):
    try:
        return convert(str(text).strip())
    except (TypeError, ValueError):
        raise ValueError() from None


def positive_int(text):
    """An integer >= 1 from `text` (ValueError otherwise)."""
    n = _number(int, text)
    if n < 1:
        raise ValueError()
    return n


def density(text):
    """A density in (0, 1] from `text` (ValueError otherwise)."""
    x = _number(float, text)
    if not 0.0 < x <= 1.0:
        raise ValueError()
    return x


def weight_count(text):
    """A number of weights >= 2 from `text` ("1e5" allowed; rounded to an integer)."""
    x = _number(float, text)
    if not math.isfinite(x) or round(x) < 2:
        raise ValueError()
    return int(round(x))


def one_of(choices):
    """Parser of a list item that must be one of `choices` (returned as given)."""
    def parse(text):
        if text not in choices:
            raise ValueError()
        return text
    return parse


def register_list_check(name, parse, what, flag_values=None):
    """Registers an absl validator of the list flag `name` (checked when the flags are
    parsed, before any work): every item must pass `parse` (see `parse_items`); the error
    names the flag and the first bad item."""
    from absl import flags

    def check(values):
        try:
            parse_items(values, parse, what)
        except ValueError as e:
            raise flags.ValidationError(str(e)) from None
        return True

    flags.register_validator(name, check, flag_values=flags.FLAGS if flag_values is None else flag_values)


# -- output ---------------------------------------------------------------------
def write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join("" if c is None else str(c) for c in row) + " |")
    return "\n".join(lines)


def fmt(x, spec=".3f", none="n/a"):
    return none if x is None else format(x, spec)


def with_ci(x, ci, spec=".3f"):
    """'x [lo, hi]' (or 'x' without an interval, 'n/a' without a value)."""
    if x is None:
        return "n/a"
    return fmt(x, spec) if not ci else f"{fmt(x, spec)} [{fmt(ci[0], spec)}, {fmt(ci[1], spec)}]"


def later_call(res, limit=None):
    """Table cell of a DST variant's later fit-loop calls (an overhead.py result).

    Without `limit`: 'ratio [ci], +allowance update, net [ci]'. With it: 'ratio [ci]
    vs limit + allowance (verdict)', the verdict judging the per-round net ratio
    (ratio - k U / t_dense_call) against `limit`; without U (no update cost
    measured) the ratio itself is judged against `limit`.
    """
    ratio, ci = res.get("later_call_ratio"), res.get("later_call_ratio_ci95")
    if ratio is None:
        return "n/a"
    s = with_ci(ratio, ci)
    allowance, net = res.get("later_call_update_allowance"), res.get("later_call_net_ratio")
    net_ci = res.get("later_call_net_ratio_ci95")
    if allowance is None:
        return s if limit is None else f"{s} ({verdict(ratio, limit, ci)}; U unknown)"
    if limit is None:
        return f"{s}, update +{fmt(allowance)}, net {with_ci(net, net_ci)}"
    return f"{s} vs {fmt(limit + allowance)} ({verdict(net, limit, net_ci)})"


def same_kernels(result):
    """Table cell of an overhead result's compiled-step check: 'yes (+k inputs)'."""
    c = result.get("compiled_step")
    if c is None:
        return "n/a"
    return f"{'yes' if c['static_same_kernels'] else 'NO'} (+{c['static_extra_inputs']} inputs)"
