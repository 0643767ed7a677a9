"""MVBench-style multiple-choice video QA as published (OpenGVLab/MVBench on the Hub).

Layout: `json/{task}.json` (a list of {"video", "question", "candidates", "answer", optional "start",
"end" in seconds}) and `video/{source folder}/{video}`; the answer is the text of the right candidate.
A video that is a folder of frames is read as a list of images. Categories: the task (file name)."""

from __future__ import annotations

import json
import os

from keye_jax.evaluate.items import CHOICE_PROMPT, Item, find_files, index_files, lettered, user

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
    with open(path) as f:
      records = json.load(f)
    for i, r in enumerate(records):
      candidates = [str(c) for c in r["candidates"]]
      element = {"type": "video", "video": _video(root, task, r["video"], by_name)}
      if "start" in r and "end" in r and isinstance(element["video"], str):
        element.update(video_start=float(r["start"]), video_end=float(r["end"]))
      text = f"Question: {r['question']}\nOptions:\n{lettered(candidates, '({letter}) {text}')}\n{CHOICE_PROMPT}"
      letter = "ABCDEFGHIJ"[candidates.index(str(r["answer"]))]
      items.append(Item(f"{task}/{i}", user([element, {"type": "text", "text": text}]), "choice", letter,
                        candidates, {"task": task}))
  return items
