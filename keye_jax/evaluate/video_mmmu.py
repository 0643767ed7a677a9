"""Video-MMMU as published (lmms-lab/VideoMMMU on the Hub).

Layout: `{Perception,Comprehension,Adaptation}/test-*.parquet`, plus the lecture videos `{id}.mp4`
anywhere under the same root (the release unpacks them into discipline folders). Columns used: id
("validation_Art_Theory_1"), question, options (list), answer (letter, or text for open questions),
question_type, and for Adaptation an optional `image` ({"bytes"}) shown after the video. A missing video
is an item error (scored wrong), not the end of the load. Prompts follow
the benchmark's own evaluation (lmms-eval). Categories: track, discipline and subject."""

from __future__ import annotations

import os

from keye_jax.evaluate.items import Item, find_files, index_files, lettered, read_parquet_rows, save_media, user
from keye_jax.evaluate.mmmu import discipline_of, subject_of

NAME = "video_mmmu"
MAX_NEW_TOKENS = 1024
TRACKS = ("Perception", "Comprehension", "Adaptation")
DIRECT = "Please directly output the option letter/data as the answer."
ADAPTATION = (DIRECT + " You should watch and learn the video content. Then apply what you learned to answer "
              "the following {kind} question. The image for this question is at the end of the video.\n")


def _track(path: str) -> str:
  for part in reversed(os.path.normpath(path).split(os.sep)):
    for t in TRACKS:
      if part.lower().startswith(t.lower()):
        return t
  return "all"


def item_from_row(row: dict, track: str, videos: dict[str, str], media_dir: str) -> Item:
  rid = str(row["id"])
  mc = row.get("question_type", "multiple-choice") == "multiple-choice"
  options = [str(o) for o in (row.get("options") or [])] if mc else []
  question = row["question"] + (f"\n{lettered(options)}" if options else "")
  if track == "Adaptation":
    text = ADAPTATION.format(kind="multi-choice" if mc else "open-ended") + question
  else:
    text = f"{question}\n{DIRECT}"
  video = videos.get(f"{rid}.mp4")
  error = None if video is not None else f"Video-MMMU item {rid}: no {rid}.mp4 under the data directory"
  content = [{"type": "video", "video": video or ""}]
  image = row.get("image")
  if isinstance(image, dict) and image.get("bytes"):
    content.append({"type": "image", "image": save_media(image["bytes"], media_dir, rid)})
  content.append({"type": "text", "text": text})
  subject = subject_of(rid)
  cats = {"track": track, "discipline": discipline_of(subject), "subject": subject}
  return Item(f"{track}/{rid}", user(content), "choice" if mc else "open", str(row["answer"]).strip(), options,
              cats, error=error)


def load(data_path: str, media_dir: str) -> list[Item]:
  videos = index_files(data_path if os.path.isdir(data_path) else os.path.dirname(data_path), (".mp4",))
  return [item_from_row(r, _track(f), videos, media_dir)
          for f in find_files(data_path, ".parquet") for r in read_parquet_rows(f)]
