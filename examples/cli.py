"""What the example scripts share at their command line (no TensorFlow import): the flag
parser that turns an absl flag error into a one-line exit message, and their output
directories, checked before a run starts and cleared of what an earlier run of the same
script left there, which the new run would otherwise restore, compare with or show
beside its own outputs."""

import os
import shutil
import sys

from absl import flags


def parse_flags(argv, flag_values=flags.FLAGS):
    """absl flag parser for `app.run(main, flags_parser=parse_flags)`: parses `argv` into
    `flag_values` (running their validators, before any model is built) and returns the
    remaining arguments; a flag error exits with one line, "error: " and the error's
    lines joined by "; ", instead of absl's usage dump."""
    try:
        return flag_values(argv)
    except flags.Error as e:
        sys.exit("error: " + "; ".join(str(e).splitlines()))


def check_given_flags_read(flag_values, readers, runs):
    """Raises ValueError naming the first flag given on the command line (parsed into
    `flag_values`) that no run reads, and the runs that do.

    Args:
      readers: ``{flag name: (whether a run reads it, which runs would)}``, checked in
        its order.
      runs: the runs in the message ("this run", "--methods=dense").
    """
    for name, (read, which) in readers.items():
        if name in flag_values and flag_values[name].present and not read:
            raise ValueError(f"{flag_values[name].serialize()} is not used by {runs}: it "
                             f"applies to {which}")


def _file_at_or_above(path):
    """The file (not a directory) that `path` is or lies under, else None."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    return existing if os.path.exists(existing) and not os.path.isdir(existing) else None


def check_directory(path, flag):
    """Raises ValueError naming `flag` where `path` cannot be a directory: it, or a
    directory above it, is a file."""
    blocking = _file_at_or_above(path)
    if blocking:
        where = "it" if blocking == os.path.abspath(path) else blocking
        raise ValueError(f"{flag}={path}: {where} is a file, not a directory")


def check_file(path, flag):
    """Raises ValueError naming `flag` where `path` cannot be a file: it is a directory,
    or a directory above it is a file."""
    if os.path.isdir(path):
        raise ValueError(f"{flag}={path}: it is a directory, not a file")
    blocking = _file_at_or_above(os.path.dirname(os.path.abspath(path)))
    if blocking:
        raise ValueError(f"{flag}={path}: {blocking} is a file, not a directory")


def make_directory(path, flag):
    """`check_directory`, then creates `path` (ValueError naming `flag` where it cannot)."""
    check_directory(path, flag)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # no permission, ...
        raise ValueError(f"{flag}={path}: cannot create it: {e.strerror or e}") from None


def remove_earlier(directory, names):
    """Removes the entries `names` of `directory` that exist (files, links or directory
    trees); returns the names removed, in the order given."""
    removed = [name for name in names if os.path.lexists(os.path.join(directory, name))]
    for name in removed:
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return removed
