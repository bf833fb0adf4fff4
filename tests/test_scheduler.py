"""The target trajectory (reference values of method.md s. 3) and the gamma controller on scripted densities."""

import itertools
import re
import warnings

import pytest

from hyperflux import PressureScheduler

REFERENCE = {
    0.90: (0.95527, [65.206, 35.895, 16.709, 11.432, 10.0]),
    0.98: (0.92417, [47.919, 17.192, 4.663, 2.471, 2.0]),
    0.99: (0.91099, [41.934, 12.502, 2.688, 1.277, 1.0]),
}


@pytest.mark.parametrize("target", sorted(REFERENCE))
def test_trajectory_matches_the_reference_values(target):
    s0, expected = REFERENCE[target]
    scheduler = PressureScheduler(target, 100)
    assert scheduler.s0 == pytest.approx(s0, abs=5e-6)
    got = [100 * scheduler.expected_density(e) for e in (10, 25, 50, 75, 100)]
    assert got == pytest.approx(expected, abs=5e-4)
    assert scheduler.expected_density(0) == 1.0
    assert scheduler.expected_density(250) == pytest.approx(1 - target)  # held after the pruning phase


def test_controller_on_a_scripted_density_sequence():
    scheduler = PressureScheduler(0.9, 10, delta=0.3, exponent=1.5)
    assert scheduler.pressure == 0.0
    expected_gamma = []
    gamma, up, down = 0.0, 0.0, 0.0
    # too dense, too dense, too dense, too sparse, too sparse, too dense
    script = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    for density in script:
        if density > scheduler.expected_density(scheduler.epoch + 1):
            gamma, up, down = gamma + 0.3 + up, up + 0.075, 0.0
        else:
            gamma, down, up = max(0.0, gamma - 0.3 - down), down + 0.075, 0.0
        expected_gamma.append(gamma)
        pressure = scheduler.step(density)
        assert pressure == pytest.approx(gamma**1.5)
    assert expected_gamma == pytest.approx([0.3, 0.675, 1.125, 0.825, 0.45, 0.75])


def test_controller_never_goes_below_zero_and_reset_releases():
    scheduler = PressureScheduler(0.5, 4)
    scheduler.step(1.0)
    assert scheduler.gamma == pytest.approx(0.3)
    scheduler.step(0.0)
    scheduler.step(0.0)
    assert scheduler.gamma == 0.0 and scheduler.pressure == 0.0
    scheduler.step(1.0)
    scheduler.reset()
    assert (scheduler.gamma, scheduler.boost_up, scheduler.boost_down) == (0.0, 0.0, 0.0)


def test_constant_and_user_schedules():
    constant = PressureScheduler.constant(0.25)
    constant.step(0.9)
    assert constant.pressure == 0.25 and constant.mode == "constant"
    listed = PressureScheduler.from_schedule([0.0, 1.0, 2.0])
    seen = [listed.pressure]
    for _ in range(4):
        listed.step(0.5)
        seen.append(listed.pressure)
    assert seen == [0.0, 1.0, 2.0, 2.0, 2.0]
    doubling = PressureScheduler.from_schedule(lambda period: 2.0 ** (period // 2))
    doubling.step(1.0), doubling.step(1.0)
    assert doubling.pressure == 2.0
    with pytest.raises(ValueError, match="no target trajectory"):
        constant.expected_density(3)


def test_state_dict_round_trip():
    a = PressureScheduler(0.95, 20)
    for density in (1.0, 0.9, 0.5, 0.6):
        a.step(density)
    b = PressureScheduler(0.95, 20)
    b.load_state_dict(a.state_dict())
    assert (b.epoch, b.gamma, b.boost_up, b.boost_down) == (a.epoch, a.gamma, a.boost_up, a.boost_down)
    assert b.step(0.4) == a.step(0.4)
    with pytest.raises(ValueError, match="epochs"):
        PressureScheduler(0.95, 30).load_state_dict(a.state_dict())
    steeper = PressureScheduler(0.95, 20, aggressivity=8.0)  # its s0 ends another trajectory at the target
    with pytest.raises(ValueError, match=r"aggressivity 6\.0, this one for 8\.0"):
        steeper.load_state_dict(a.state_dict())
    # a state's settings no longer replace this scheduler's silently
    with pytest.raises(ValueError, match=r"exponent 1\.5, this one for 2\.0"):
        PressureScheduler(0.95, 20, exponent=2.0).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match=r"delta 0\.3, this one for 0\.5"):
        PressureScheduler(0.95, 20, delta=0.5).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match=r"constant 0\.5, this one for 0\.8"):
        PressureScheduler.constant(0.8).load_state_dict(PressureScheduler.constant(0.5).state_dict())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_sparsity": 1.0, "epochs": 10}, "fraction in"),
        ({"target_sparsity": 0.0, "epochs": 10}, "fraction in"),
        ({"target_sparsity": 98, "epochs": 10}, "0.98 means 98%"),
        ({"target_sparsity": 0.9, "epochs": 0}, "an integer >= 1"),
        ({"pressure": -1.0}, "finite number >= 0"),
        ({"schedule": []}, "non-empty"),
        ({}, "exactly one"),
        ({"target_sparsity": 0.9, "epochs": 5, "pressure": 1.0}, "exactly one"),
    ],
)
def test_bad_arguments_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PressureScheduler(**kwargs)


def test_measured_density_must_be_a_fraction():
    with pytest.raises(ValueError, match="fraction"):
        PressureScheduler(0.9, 10).step(98.0)


def test_a_trajectory_too_short_for_its_target_warns():
    with pytest.warns(
        UserWarning, match=r"in 2 periods the trajectory reaches 47\.\d+% density at the lowest"
    ):
        PressureScheduler(0.9, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PressureScheduler(0.9, 4)  # 4 periods reach 7.1% at the lowest: enough for 90%
        PressureScheduler(0.99, 100)


def test_a_target_shallower_than_the_retention_cap_allows_is_held_not_overshot():
    """100 periods at a retention of at most 0.999 end at 90.5% density or below: a 5% target is reached
    early and held, where the bare trajectory would have the controller prune to 90.5%."""
    scheduler = PressureScheduler(0.05, 100)
    densities = [scheduler.expected_density(e) for e in range(101)]
    assert densities[100] == pytest.approx(0.95)
    assert min(densities) == pytest.approx(0.95)
    assert densities[10] < 1.0 and all(a >= b for a, b in itertools.pairwise(densities))
    assert densities.index(0.95) < 60  # reached early, then held


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: PressureScheduler(0.9, float("nan")), "epochs must be an integer >= 1, got nan"),
        (lambda: PressureScheduler(0.9, float("inf")), "epochs must be an integer >= 1, got inf"),
        (lambda: PressureScheduler(0.9, 2.5), "epochs must be an integer >= 1, got 2.5"),
        (lambda: PressureScheduler.constant("x"), "a constant pressure must be a number, got 'x'"),
        (lambda: PressureScheduler.constant(True), "a constant pressure must be a number, got True"),
        (lambda: PressureScheduler.constant("0.5"), "a constant pressure must be a number, got '0.5'"),
        (lambda: PressureScheduler(0.9, "30"), "epochs must be a number, got '30'"),
        (lambda: PressureScheduler.constant(-1.0), "a constant pressure must be a finite number >= 0"),
    ],
)
def test_bad_epochs_and_pressures_are_value_errors_naming_them(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()
