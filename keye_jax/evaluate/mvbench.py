"""MVBench-style multiple-choice video QA as published (OpenGVLab/MVBench on the Hub).

Layout: `json/{task}.json` (a list of {"video", "question", "candidates", "answer", optional "start",
"end" in seconds}) and `video/{source folder}/{video}`; the answer is the text of the right candidate.
A video that is a folder of frames is read as a list of images; with "start"/"end" only the frames inside
that window, as MVBench's own reader does (frames numbered from 1 at FRAME_FPS = 3 frames per second:
indices round(start * 3) .. round(end * 3)); a video file gets video_start/video_end. A missing video is
an item error, not the end of the load. Categories: the task (file name)."""

from __future__ import annotations

import os
import re

from keye_jax.evaluate.items import CHOICE_PROMPT, Item, find_files, index_files, lettered, need, read_json, user

NAME = "mvbench"
MAX_NEW_TOKENS = 64
# Task -> folder under video/ (MVBench's own table).
VIDEO_FOLDERS = {
    "object_interaction": "star/Charades_v1_480", "action_sequence": "star/Charades_v1_480",
    "action_prediction": "star/Charades_v1_480", "action_localization": "sta/sta_video",
    "moving_count": "clevrer/video_validation", "fine_grained_pose": "nturgbd",
    "character_order": "perception/videos", "object_shuffle": "perception/videos",
    "egocentric_navigation": "vlnqa", "moving_direction": "clevrer/video_validation",
    "episodic_reasoning": "tvqa/frames_fps3_hq", "fine_grained_action": "Moments_in_Time_Raw/videos",
    "scene_transition": "scene_qa/video", "state_change": "perception/videos",
    "moving_attribute": "clevrer/video_validation", "action_antonym": "ssv2_video",
    "unexpected_action": "FunQA_test/test", "counterfactual_inference": "clevrer/video_validation",
    "object_existence": "clevrer/video_validation", "action_count": "perception/videos",
}
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
FRAME_FPS = 3  # MVBench's frame folders (tvqa frames_fps3_hq) are sampled at 3 fps, numbered from 1


def frames_in_window(frames: list[str], start: float | None, end: float | None) -> list[str]:
  """The frames of a folder (sorted paths) whose number lies in [round(start*3), round(end*3)]; a frame's
  number is the last integer of its file name, else its position from 1."""
  if start is None or end is None:
    return frames
  lo, hi = max(1, round(start * FRAME_FPS)), round(end * FRAME_FPS)

  def number(i: int, path: str) -> int:
    digits = re.findall(r"\d+", os.path.splitext(os.path.basename(path))[0])
    return int(digits[-1]) if digits else i + 1

  kept = [p for i, p in enumerate(frames) if lo <= number(i, p) <= hi]
  return kept or frames


def _video(root: str, task: str, name: str, by_name: dict[str, str]):
  for cand in (os.path.join(root, "video", VIDEO_FOLDERS.get(task, ""), name), os.path.join(root, "video", name),
               os.path.join(root, name)):
    if os.path.isdir(cand):  # frames
      return sorted(os.path.join(cand, f) for f in os.listdir(cand) if f.lower().endswith(IMAGE_EXTS))
    if os.path.isfile(cand):
      return cand
  if os.path.basename(name) in by_name:
    return by_name[os.path.basename(name)]
  raise FileNotFoundError(f"MVBench task {task}: video {name} not found under {root}/video")


def load(data_path: str, media_dir: str | None = None) -> list[Item]:
  files = find_files(data_path, ".json")
  root = data_path if os.path.isdir(data_path) else os.path.dirname(os.path.dirname(os.path.abspath(data_path)))
  by_name = index_files(root, (".mp4", ".webm", ".avi", ".mkv", ".gif"))
  items = []
  for path in files:
    task = os.path.splitext(os.path.basename(path))[0]
    records = read_json(path)
    if not isinstance(records, list):
      raise ValueError(f"{path}: expected a JSON list of questions")
    for i, r in enumerate(records):
      where = f"{path} item {i}"
      candidates = [str(c) for c in need(r, "candidates", where)]
      answer, error = str(need(r, "answer", where)), None
      if answer not in candidates:
        raise ValueError(f"{where}: answer {answer!r} is not one of the candidates")
      start, end = (float(r["start"]), float(r["end"])) if "start" in r and "end" in r else (None, None)
      try:
        video = _video(root, task, need(r, "video", where), by_name)
      except FileNotFoundError as e:
        video, error = "", str(e)
      element = {"type": "video", "video": video}
      if isinstance(video, list):
        element["video"] = frames_in_window(video, start, end)
      elif start is not None:
        element.update(video_start=start, video_end=end)
      text = f"Question: {need(r, 'question', where)}\nOptions:\n{lettered(candidates, '({letter}) {text}')}\n" \
             f"{CHOICE_PROMPT}"
      items.append(Item(f"{task}/{i}", user([element, {"type": "text", "text": text}]), "choice",
                        "ABCDEFGHIJ"[candidates.index(answer)], candidates, {"task": task}, error=error))
  return items
