"""The public API: `import neuralode` is the library alone."""

import inspect
import subprocess
import sys

import neuralode

LIBRARY = {
    "ADJOINT_NAMES",
    "BackpropAdjoint",
    "Choice",
    "ContinuousAdjoint",
    "MLPField",
    "NeuralODE",
    "Reversible",
    "ReversibleAdjoint",
    "SymplecticAdjoint",
    "choose_adjoint",
    "data",
    "get_adjoint",
}


def test_import_neuralode_imports_no_application():
    # A fresh interpreter: this one has imported the tests' own dependencies.
    code = (
        "import neuralode, sys; "
        "assert 'matplotlib' not in sys.modules and 'tqdm' not in sys.modules; "
        "assert 'neuralode.training' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_top_level_names_are_the_library():
    # Modules appear as attributes once something imports them (the subpackages,
    # jaxtyping's import hook): `data` is the one module the library exports.
    public = {
        name
        for name, value in vars(neuralode).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public | {"data"} == LIBRARY and inspect.ismodule(neuralode.data)
