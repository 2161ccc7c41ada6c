"""Base datasets, shifted sequences of time steps, and their figures."""
from s2f_jax.data.figures import PAPER_CLASSES, PAPER_PER_CLASS, save_sequence_grid
from s2f_jax.data.sequence import Sequence, SequenceSpec, Split, Step, build_sequence, split_real_sequence
from s2f_jax.data.shifts import SHIFT_BLOCKS, ShiftKind, ShiftState, register_shift, shift_blocks
from s2f_jax.data.datasets import BaseDataset, RealSequence, load_digits
from s2f_jax.data.sources import load_source, register_source, source_names
