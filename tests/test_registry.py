"""Tests of keras_dst.registry: the one registry type behind every `register_*` function."""

import pytest

import keras_dst
from keras_dst import criterion_names
from keras_dst.registry import Registry
from keras_dst.validation import normalize_name


def test_register_get_names_contains():
    r = Registry("widget")
    assert r.register("round_one", 1) == 1
    r.register("square", 2)
    assert r.get("round_one") == 1 and r.get("square") == 2
    assert r.names() == ("round_one", "square")  # as registered, sorted
    assert list(r) == ["round_one", "square"]
    assert "round_one" in r and "triangle" not in r


def test_lookup_ignores_case_underscore_and_dash():
    r = Registry("widget")
    r.register("reciprocal_sensitivity", "x")
    for spelling in ("ReciprocalSensitivity", "reciprocal-sensitivity", "RECIPROCAL_SENSITIVITY",
                     "reciprocalsensitivity"):
        assert r.get(spelling) == "x"
        assert spelling in r
    assert normalize_name("Reciprocal_Sensi-tivity") == "reciprocalsensitivity"


def test_duplicate_refused_with_kind_and_name():
    r = Registry("widget")
    r.register("gear", 1)
    with pytest.raises(ValueError, match=r"widget 'gear' is already registered.*overwrite=True"):
        r.register("gear", 2)
    # The same rule applies to spellings that match the taken name.
    with pytest.raises(ValueError, match=r"widget 'GEAR' is already registered \(as 'gear'\)"):
        r.register("GEAR", 2)
    with pytest.raises(ValueError, match="already registered"):
        r.check_available("g-e-a-r")
    r.check_available("g-e-a-r", overwrite=True)  # no error
    r.check_available("cog")
    assert r.get("gear") == 1


def test_overwrite_replaces():
    r = Registry("widget")
    r.register("gear", 1)
    r.register("Gear", 2, overwrite=True)
    assert r.get("gear") == 2
    assert r.names() == ("Gear",)  # one entry, shown as last registered


def test_unknown_name_lists_known_ones():
    r = Registry("widget")
    r.register("gear", 1)
    r.register("cog", 2)
    with pytest.raises(ValueError, match=r"Unknown widget 'sprocket'; known: 'cog', 'gear'"):
        r.get("sprocket")
    with pytest.raises(ValueError, match=r"Unknown gadget 'x'; known: none\.$"):
        Registry("gadget").get("x")


def test_an_unknown_name_of_a_users_registry_says_where_it_comes_from():
    # (a DST config saved where a user's criterion was registered, loaded in a fresh process)
    with pytest.raises(ValueError, match=r"Unknown criterion 'mine'; known: .*'magnitude'.* "
                                         r"\(one registered with keras_dst.register_criterion "
                                         r"is known in a process once the code registering it "
                                         r"has run there\)\.$"):
        keras_dst.get_criterion("mine")
    with pytest.raises(ValueError, match=r"got schedule='mine' \(one registered with "
                                         r"keras_dst.schedules.register_schedule is known"):
        keras_dst.DynamicSparseTraining(schedule="mine")


def test_empty_name_refused():
    r = Registry("widget")
    for name in ("", "_", "-_-"):
        with pytest.raises(ValueError, match="widget name must be a non-empty str"):
            r.register(name, 1)


def test_class_keys_match_exactly():
    class Base:
        pass

    class Child(Base):
        pass

    r = Registry("thing class", by_name=False)
    r.register(Base, "base")
    assert Base in r and Child not in r  # no MRO walk here; callers do that
    assert r.get(Base) == "base" and r.names() == ("test_class_keys_match_exactly.<locals>.Base",)
    with pytest.raises(ValueError, match=r"thing class '.*Base' is already registered"):
        r.register(Base, "again")
    r.register(Base, "again", overwrite=True)
    assert r.get(Base) == "again"
    with pytest.raises(ValueError, match=r"Unknown thing class '.*Child'"):
        r.get(Child)


def test_unregister():
    r = Registry("widget")
    r.register("gear", 1)
    assert r.unregister("GEAR") == 1
    assert "gear" not in r and r.unregister("gear") is None
    r.register("gear", 3)  # free again
    assert r.get("gear") == 3


def test_names_are_strings_and_registered_functions_are_callable():
    r = Registry("widget")
    with pytest.raises(TypeError, match=r"widget name must be a non-empty str, got None"):
        r.register(None, 1)
    with pytest.raises(TypeError, match=r"register_criterion\('probe'\) decorates a function, "
                                        r"got None"):
        keras_dst.register_criterion("probe", ordering="after_optimizer")(None)
    with pytest.raises(TypeError, match=r"register_growth\('probe'\) decorates a function, got 5"):
        keras_dst.register_growth("probe")(5)
    with pytest.raises(TypeError, match=r"criterion name must be a non-empty str, got None"):
        keras_dst.register_criterion(None, ordering="after_optimizer")
    assert "probe" not in criterion_names() and "None" not in criterion_names()
