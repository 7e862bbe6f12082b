"""Readers of task files (GLUE TSV, label CSV, mr, bbc): Examples, with errors naming file:line.

Real files: a GLUE pair row with one empty sentence is kept (`[CLS] a [SEP] [SEP]`) and counted in
one warning per file; a CSV whose first row is a header (`Class Index,Title,Description`) has it
skipped with a note; `mr` and `bbc` drop exact duplicate texts (first kept).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from absl import logging

from mp_jax.data import tasks

csv.field_size_limit(sys.maxsize)


class DataError(ValueError):
  """Bad or missing input data (message names the file and line)."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One labelled text or text pair."""
  text_a: str
  text_b: str | None
  label: int


class Dataset(dict):
  """Split name -> list[Example], plus `label_names`."""
  def __init__(self, splits: dict[str, list[Example]], label_names: Sequence[str]):
    super().__init__(splits)
    self.label_names = list(label_names)

  @property
  def num_labels(self) -> int:
    return len(self.label_names)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, decoded line incl. newline); invalid UTF-8 -> DataError."""
  if not path.is_file():
    raise DataError(f'{path}: file not found')
  with open(path, 'rb') as f:
    offset = 0
    for lineno, raw in enumerate(f, 1):
      try:
        line = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        raise DataError(
            f'{path}:{lineno}: invalid UTF-8 at byte offset {offset + e.start}') from None
      if lineno == 1:
        line = line.removeprefix('\ufeff')
      offset += len(raw)
      yield lineno, line


def _nonblank(path: Path) -> Iterator[tuple[int, list[str]]]:
  """Yields (line number, tab-separated fields) of non-blank lines (no quoting, as GLUE)."""
  for lineno, line in _lines(path):
    line = line.rstrip('\r\n')
    if line.strip():
      yield lineno, line.split('\t')


def _label(path: Path, lineno: int, raw: str, known: Sequence[str]) -> int:
  raw = raw.strip()
  if raw not in known:
    raise DataError(f'{path}:{lineno}: unknown label {raw!r}; known labels: {list(known)}')
  return known.index(raw)


def _text(path: Path, lineno: int, text: str, what: str = 'text') -> str:
  text = text.strip()
  if not text:
    raise DataError(f'{path}:{lineno}: empty {what}')
  return text


def read_glue_tsv(path: str | os.PathLike, task: str) -> list[Example]:
  """Reads a labelled GLUE TSV file, locating columns by header name."""
  path = Path(path)
  if task not in tasks.GLUE:
    raise DataError(f'unknown GLUE task {task!r}; known: {sorted(tasks.GLUE)}')
  layout = tasks.GLUE[task]
  col_a, col_b, col_y, known = layout.text_a, layout.text_b, layout.label, layout.raw_labels
  rows = _nonblank(path)
  _, header = next(rows, (0, None))
  if header is None:
    raise DataError(f'{path}: empty file (no header)')
  header = [h.strip() for h in header]
  missing = [c for c in (col_a, col_b, col_y) if c is not None and c not in header]
  if missing:
    raise DataError(f'{path}:1: header lacks column(s) {missing} for task {task!r}: {header}')
  ia, iy = header.index(col_a), header.index(col_y)
  ib = header.index(col_b) if col_b is not None else None
  out, empty = [], []
  for lineno, fields in rows:
    if len(fields) != len(header):
      raise DataError(f'{path}:{lineno}: malformed row: {len(fields)} fields, header has '
                      f'{len(header)}')
    if ib is None:
      text_a, text_b = _text(path, lineno, fields[ia], col_a), None
    else:  # one empty side is a valid pair (QQP train has empty questions); both is no input
      text_a, text_b = fields[ia].strip(), fields[ib].strip()
      if not (text_a or text_b):
        raise DataError(f'{path}:{lineno}: empty {col_a} and {col_b}')
      if not (text_a and text_b):
        empty.append(lineno)
    out.append(Example(text_a, text_b, _label(path, lineno, fields[iy], known)))
  warn_empty_segments(path, empty, col_a, col_b, 'lines')
  return out


def warn_empty_segments(where: str | os.PathLike, rows: Sequence[int], col_a: str, col_b: str,
                        unit: str) -> None:
  """One warning for the pairs kept with one side empty (`rows`: their lines or record numbers)."""
  if rows:
    logging.warning('%s: kept %d row(s) with an empty %s or %s as an empty segment (%s %s%s)',
                    where, len(rows), col_a, col_b, unit, ', '.join(map(str, rows[:5])),
                    ', ...' if len(rows) > 5 else '')


def is_csv_header(fields: Sequence[str], known: Sequence[str],
                  label_names: Sequence[str] = ()) -> bool:
  """True if a CSV row looks like column names (`Class Index,Title,Description`, `label,text`).

  Every field must be a short name (1-3 words of letters, digits, `_`, `-`; no sentence
  punctuation) and the first field neither a label (`3`) nor a label's name (`Sports`), so a
  data row with a bad label still fails with its line instead of being skipped.
  """
  first = fields[0].strip() if fields else ''
  if first in known or first.lower() in {n.lower() for n in label_names}:
    return False
  return all(re.fullmatch(r'[A-Za-z][\w-]*( [\w-]+){0,2}', f.strip()) and len(f.strip()) <= 32
             for f in fields)


def read_label_csv(path: str | os.PathLike, task: str) -> list[Example]:
  """Reads a `label,title,text` or `label,text` CSV, 1-based labels; a header row is skipped."""
  path = Path(path)
  if task not in tasks.CSV:
    raise DataError(f'unknown CSV task {task!r}; known: {sorted(tasks.CSV)}')
  known = [str(i + 1) for i in range(len(tasks.CSV[task]))]
  reader = csv.reader((line for _, line in _lines(path)), strict=True)
  out, prev, first = [], 0, True
  try:
    for fields in reader:
      lineno, prev = prev + 1, reader.line_num  # a quoted field may span several lines
      if not ''.join(fields).strip():
        continue
      header, first = first and is_csv_header(fields, known, tasks.CSV[task]), False
      if header:
        logging.info('%s:%d: skipped header row %s', path, lineno, fields)
        continue
      if len(fields) not in (2, 3):
        raise DataError(f'{path}:{lineno}: malformed row: {len(fields)} fields, expected '
                        '2 (label,text) or 3 (label,title,text)')
      text = ' '.join(f.strip() for f in fields[1:] if f.strip()).replace('\\n', ' ')
      out.append(Example(_text(path, lineno, text), None, _label(path, lineno, fields[0], known)))
  except csv.Error as e:
    raise DataError(f'{path}:{reader.line_num}: malformed CSV row: {e}') from None
  return out


def read_mr(path: str | os.PathLike) -> list[Example]:
  """Reads movieReviewSnippets_GroundTruth.txt (id, valence, text); label = sign, 0 dropped."""
  path = Path(path)
  out = []
  for lineno, fields in _nonblank(path):
    if len(fields) != 3:
      raise DataError(f'{path}:{lineno}: malformed row: {len(fields)} fields, expected 3')
    try:
      valence = float(fields[1])
    except ValueError:
      valence = math.nan
    if not math.isfinite(valence):
      raise DataError(f'{path}:{lineno}: valence {fields[1]!r} is not a number')
    text = _text(path, lineno, fields[2])
    if valence != 0:
      out.append(Example(text, None, int(valence > 0)))
  return _dedup(out)


def read_bbc(path: str | os.PathLike) -> tuple[list[Example], list[str]]:
  """Reads `<label>/*.txt` folders (sorted); returns deduplicated examples and label names."""
  path = Path(path)
  if not path.is_dir():
    raise DataError(f'{path}: folder not found')
  labels = sorted(p.name for p in path.iterdir() if p.is_dir())
  if not labels:
    raise DataError(f'{path}: no label sub-folders')
  out = []
  for y, name in enumerate(labels):
    for f in sorted((path / name).glob('*.txt')):
      raw = f.read_bytes()
      try:
        text = raw.decode('utf-8')
      except UnicodeDecodeError:
        text = raw.decode('cp1252', errors='replace')  # sport/199.txt has a Latin-1 pound sign.
      out.append(Example(_text(f, 1, text), None, y))
  return _dedup(out), labels


def _dedup(examples: list[Example]) -> list[Example]:
  """Drops examples whose (text_a, text_b) was seen before."""
  first = {}
  for ex in examples:
    first.setdefault((ex.text_a, ex.text_b), ex)
  return list(first.values())
