"""The symplectic adjoint, in parts: the adjoint and its custom VJP (`_adjoint.py`), the
forward record (`_record.py`), where checkpoints go (`_schedule.py`), one step's
pullback (`_tableau.py`), the outputs' pullbacks (`_outputs.py`) and the reverse loops
(`_backward.py`)."""

from ._adjoint import SymplecticAdjoint as SymplecticAdjoint
