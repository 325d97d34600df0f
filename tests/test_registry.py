import diffrax
import pytest
from helpers import as_users_run_it

import neuralode


def test_names_map_to_strategies():
    assert neuralode.ADJOINT_NAMES == (
        "backprop",
        "continuous",
        "symplectic",
        "reversible",
    )
    assert isinstance(neuralode.get_adjoint("backprop"), neuralode.BackpropAdjoint)
    assert isinstance(neuralode.get_adjoint("symplectic"), neuralode.SymplecticAdjoint)
    assert isinstance(neuralode.get_adjoint("reversible"), neuralode.ReversibleAdjoint)
    continuous = neuralode.get_adjoint("continuous")
    assert isinstance(continuous, neuralode.ContinuousAdjoint)
    assert isinstance(continuous.backsolve, diffrax.BacksolveAdjoint)
    for name in neuralode.ADJOINT_NAMES:
        assert isinstance(neuralode.get_adjoint(name), diffrax.AbstractAdjoint)


def test_unknown_name_lists_valid_names():
    with pytest.raises(
        ValueError, match="backprop.*continuous.*symplectic.*reversible"
    ):
        neuralode.get_adjoint("adjoint")


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError, match="rtol"):
        neuralode.get_adjoint("continuous", tolerance=1e-3)
    with pytest.raises(ValueError, match="unknown option"):
        neuralode.get_adjoint("symplectic", rtol=1e-3)
    with pytest.raises(ValueError, match="unknown option"):
        neuralode.get_adjoint("backprop", checkpoints=3)
    with pytest.raises(ValueError, match="coupling"):
        neuralode.get_adjoint("reversible", checkpoints=3)


def test_symplectic_checkpoints_option():
    assert neuralode.get_adjoint("symplectic", checkpoints=3).checkpoints == 3
    assert neuralode.get_adjoint("symplectic", checkpoints="all").checkpoints == "all"
    assert neuralode.get_adjoint("symplectic").checkpoints is None
    for bad in (0, -2, 2.5, True, "every"):
        with as_users_run_it():
            with pytest.raises(
                ValueError, match="`checkpoints` must be a positive int"
            ):
                neuralode.get_adjoint("symplectic", checkpoints=bad)


def test_continuous_options():
    adjoint = neuralode.get_adjoint("continuous", rtol=1e-7, atol=1e-9, seminorm=True)
    controller = adjoint.backsolve.kwargs["stepsize_controller"]
    assert (controller.rtol, controller.atol) == (1e-7, 1e-9)
    assert controller.norm is diffrax.adjoint_rms_seminorm
    plain = neuralode.get_adjoint("continuous", rtol=1e-7, atol=1e-9)
    assert (
        plain.backsolve.kwargs["stepsize_controller"].norm
        is not diffrax.adjoint_rms_seminorm
    )
    solver = neuralode.get_adjoint("continuous", solver=diffrax.Dopri8())
    assert isinstance(solver.backsolve.kwargs["solver"], diffrax.Dopri8)
    with pytest.raises(ValueError, match="needs `rtol` and `atol`"):
        neuralode.get_adjoint("continuous", seminorm=True)
    with pytest.raises(ValueError, match="both"):
        neuralode.get_adjoint("continuous", rtol=1e-3)
    with pytest.raises(ValueError, match="`seminorm` must be True or False"):
        neuralode.get_adjoint("continuous", rtol=1e-3, atol=1e-3, seminorm="no")


def test_continuous_adjoint_defaults_to_backsolve():
    assert neuralode.ContinuousAdjoint().backsolve == diffrax.BacksolveAdjoint()
    with as_users_run_it():
        with pytest.raises(ValueError, match="must be a diffrax.BacksolveAdjoint"):
            neuralode.ContinuousAdjoint(diffrax.RecursiveCheckpointAdjoint())


def test_reversible_coupling_option():
    adjoint = neuralode.get_adjoint("reversible", coupling=0.9)
    assert adjoint.coupling == 0.9
    assert adjoint.wrap(diffrax.Heun()) == neuralode.Reversible(diffrax.Heun(), 0.9)
    default = neuralode.get_adjoint("reversible").wrap(diffrax.Tsit5())
    assert default.coupling == 0.999
    for bad in (0.0, -0.5, 1.5, True, "0.9"):
        with as_users_run_it():
            with pytest.raises(ValueError, match="`coupling` must be a number"):
                neuralode.get_adjoint("reversible", coupling=bad)
            with pytest.raises(ValueError, match="`coupling` must be a number"):
                neuralode.Reversible(diffrax.Tsit5(), coupling=bad)
    with as_users_run_it():
        with pytest.raises(ValueError, match="explicit Runge--Kutta"):
            neuralode.Reversible(diffrax.Kvaerno3())
