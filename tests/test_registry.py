import diffrax
import pytest
from helpers import as_users_run_it

import neuralode


def test_names_map_to_strategies():
    assert neuralode.ADJOINT_NAMES == ("backprop", "continuous", "symplectic")
    assert isinstance(neuralode.get_adjoint("backprop"), neuralode.BackpropAdjoint)
    assert isinstance(neuralode.get_adjoint("symplectic"), neuralode.SymplecticAdjoint)
    continuous = neuralode.get_adjoint("continuous")
    assert isinstance(continuous, neuralode.ContinuousAdjoint)
    assert isinstance(continuous.backsolve, diffrax.BacksolveAdjoint)
    for name in neuralode.ADJOINT_NAMES:
        assert isinstance(neuralode.get_adjoint(name), diffrax.AbstractAdjoint)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="backprop.*continuous.*symplectic"):
        neuralode.get_adjoint("adjoint")


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError, match="rtol"):
        neuralode.get_adjoint("continuous", tolerance=1e-3)
    with pytest.raises(ValueError, match="unknown option"):
        neuralode.get_adjoint("symplectic", rtol=1e-3)
    with pytest.raises(ValueError, match="unknown option"):
        neuralode.get_adjoint("backprop", checkpoints=3)


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
