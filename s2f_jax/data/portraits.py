"""Portraits (yearbook faces, original.md S2F §1.8) as a sequence of 8 decades from local PNG files.

Accepted layouts, in `root` or one of its immediate sub-folders (e.g.
`faces_aligned_small_mirrored_co_aligned_cropped_cleaned/`):
- the split folders `time0/`..`time7/`, each with class folders `0/` (male) and `1/` (female), as made by the
  original `create_yearbook_folders.sh` (used when present);
- the raw download: `M/` and `F/` folders of PNGs named with a leading year, e.g.
  `F/1905_Ohio_Cleveland_Central_0-1.png`.
  Years 1930..1999 go to step (year − 1930) // 10, years from 2000 to step 7, earlier years are dropped.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from s2f_jax.data import decoded_cache
from s2f_jax.data.datasets import RealSequence
from s2f_jax.errors import UserError

NUM_STEPS = 8
STEP_NAMES = tuple(f'{1930 + 10 * t}s' for t in range(NUM_STEPS))
CLASS_NAMES = ('male', 'female')
_RAW_FOLDERS = ('M', 'F')  # label 0, label 1
_IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
_YEAR = re.compile(r'^(\d{4})')


def _images_in(folder: Path) -> list[Path]:
  """Image files of `folder`, sorted by name (torchvision ImageFolder order)."""
  return sorted((f for f in folder.iterdir() if f.is_file() and f.name.lower().endswith(_IMAGE_EXTENSIONS)
                 and not f.name.startswith('.')), key=lambda f: f.name)


def decade_step(year: int) -> int | None:
  """Time step of a photo taken in `year`: 0 for the 1930s … 6 for the 1990s, 7 from 2000; None before 1930."""
  return None if year < 1930 else min((year - 1930) // 10, NUM_STEPS - 1)


def _files_from_time_folders(folder: Path) -> list[list[tuple[Path, int]]]:
  """Per step, (file, label) for `folder`/time{t}/{0,1}/*, label folder 0 first, files sorted by name."""
  steps = []
  for t in range(NUM_STEPS):
    missing = [f'time{t}/{c}/' for c in '01' if not (folder / f'time{t}' / c).is_dir()]
    if missing:
      raise UserError(f"portraits: incomplete time-step folders in {folder}: missing {', '.join(missing)}")
    steps.append([(f, label) for label in (0, 1) for f in _images_in(folder / f'time{t}' / str(label))])
  return steps


def _files_from_raw_folders(folder: Path) -> list[list[tuple[Path, int]]]:
  """Per step, (file, label) for `folder`/{M,F}/YYYY_*.png binned by decade; M (0) first, files sorted by name."""
  missing = [f'{c}/' for c in _RAW_FOLDERS if not (folder / c).is_dir()]
  if missing:
    raise UserError(f"portraits: incomplete Portraits folders in {folder}: missing {', '.join(missing)}")
  steps: list[list[tuple[Path, int]]] = [[] for _ in range(NUM_STEPS)]
  for label, name in enumerate(_RAW_FOLDERS):
    for f in _images_in(folder / name):
      year = _YEAR.match(f.name)
      step = decade_step(int(year.group(1))) if year else None
      if step is not None:
        steps[step].append((f, label))
  return steps


def decode_image(file: Path | str, image_size: int, dataset: str = 'portraits') -> np.ndarray:
  """PIL bilinear resize of one image (in its own mode, as torchvision's Resize) → uint8 [size, size, 3]; an
  unreadable file is a UserError naming `dataset` and the file."""
  try:
    with Image.open(file) as image:
      image = image if image.mode in ('L', 'RGB') else image.convert('RGB')
      pixels = np.asarray(image.resize((image_size, image_size), Image.BILINEAR))
  except (OSError, ValueError) as e:
    raise UserError(f"{dataset}: cannot decode image {file}: {' '.join(str(e).split())}") from None
  return np.repeat(pixels[..., None], 3, axis=-1) if pixels.ndim == 2 else pixels


def load_portraits(root: str | Path, image_size: int = 32) -> RealSequence:
  """The Portraits sequence: 8 steps (1930s..2000s) of uint8 [N_t, image_size, image_size, 3] images.

  Labels are int32, 0 = male and 1 = female. Greyscale images are repeated over 3 channels; decoded once, then read
  from the decoded-dataset cache (`decoded_cache`) while the files are unchanged. Raises UserError (one
  line) when no layout is found, a layout is incomplete, or a decade has no images.
  """
  root = Path(root)
  if not root.is_dir():
    raise UserError(f'portraits: data root {root} is not a folder')
  folders = [root] + sorted(p for p in root.iterdir() if p.is_dir())
  time_folder = next((f for f in folders if (f / 'time0').is_dir()), None)
  raw_folder = next((f for f in folders if any((f / c).is_dir() for c in _RAW_FOLDERS)), None)
  if time_folder is not None:
    steps = _files_from_time_folders(time_folder)
  elif raw_folder is not None:
    steps = _files_from_raw_folders(raw_folder)
  else:
    raise UserError(f'portraits: no Portraits images under {root} (looked there and in its sub-folders for M/ and F/ '
                    f'folders of YYYY_*.png files, or time0/..time7/ folders with 0/ and 1/ sub-folders)')
  empty = [STEP_NAMES[t] for t, files in enumerate(steps) if not files]
  if empty:
    raise UserError(f"portraits: no images for {', '.join(empty)} under {time_folder or raw_folder}")
  arrays = decoded_cache.cached_arrays(
      f'portraits {image_size}', [f for files in steps for f, _ in files],
      lambda: {f'images_{t}': np.stack([decode_image(f, image_size) for f, _ in files]) for t, files in enumerate(steps)})
  return RealSequence(
      name='portraits', images=[arrays[f'images_{t}'] for t in range(len(steps))],
      labels=[np.array([label for _, label in files], np.int32) for files in steps],
      class_names=CLASS_NAMES, step_names=STEP_NAMES)
