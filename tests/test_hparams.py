"""ift.hparams: every failed check is one line naming the full model.* key."""

import pytest

from ift import hparams


@pytest.mark.parametrize("check,args,message", [
    (hparams.integer, ("steps", 1.5, 1), "model.steps must be an int >= 1, got 1.5"),
    (hparams.integer, ("steps", True, 0), "model.steps must be an int >= 0, got True"),
    (hparams.positive, ("inner.tol", 0.0), "model.inner.tol must be a number > 0, got 0.0"),
    (hparams.positive, ("lr", -1, True), "model.lr must be a number >= 0, got -1"),
    (hparams.positive, ("clip", "x", False, True), "model.clip must be a number > 0 or null, got 'x'"),
    (hparams.one_of, ("mode", "foo", ("a", "b")), "model.mode must be one of a, b, got 'foo'"),
    (hparams.in_range, ("momentum", 1.0, 0, 1), "model.momentum must be in [0, 1), got 1.0"),
])
def test_failed_checks_name_the_full_key(check, args, message):
    with pytest.raises(ValueError) as err:
        check(*args)
    assert str(err.value) == message
    assert "\n" not in str(err.value)


def test_passing_checks_return_the_value():
    assert hparams.integer("steps", 3, 1) == 3
    assert hparams.positive("lr", 2) == 2.0
    assert hparams.positive("clip", None, allow_none=True) is None
    assert hparams.one_of("mode", "a", ("a", "b")) == "a"
    assert hparams.in_range("momentum", 1.0, 0, 1, closed_high=True) == 1.0
