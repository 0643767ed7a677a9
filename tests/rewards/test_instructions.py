"""IFEval constraint rewards on hand-made pass / fail responses, one pair per instruction type (lm-eval's
checkers through keye_jax.evaluate.ifeval)."""

from __future__ import annotations

import pytest

pytest.importorskip("keye_jax.evaluate.ifeval")

from train.rewards import registry  # noqa: E402

CASES = [  # (instruction id, kwargs, a response that follows it, one that does not)
  ("length_constraints:number_words", {"relation": "less than", "num_words": 10}, "A short answer.",
   " ".join(["word"] * 20)),
  ("length_constraints:number_sentences", {"relation": "at least", "num_sentences": 3}, "One. Two. Three.",
   "Only one."),
  ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First part.\n***\nSecond part.",
   "Just one part."),
  ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
   "First.\n\nThen more.", "First.\n\nAnd more."),
  ("keywords:existence", {"keywords": ["circle"]}, "It is a circle.", "It is a square."),
  ("keywords:forbidden_words", {"forbidden_words": ["red"]}, "The ball is blue.", "The ball is red."),
  ("keywords:frequency", {"keyword": "shape", "frequency": 2, "relation": "at least"},
   "A shape next to a shape.", "One shape."),
  ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"},
   "Zig zag.", "Straight line."),
  ("detectable_format:json_format", {}, '{"colour": "red"}', "colour: red"),
  ("detectable_format:title", {}, "<<Shapes>>\nThree circles.", "Shapes\nThree circles."),
  ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", "* one"),
  ("detectable_format:number_highlighted_sections", {"num_highlights": 1}, "This is *important*.", "Plain."),
  ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
   "Section 1\nred\nSection 2\nblue", "Section 1\nred"),
  ("detectable_format:constrained_response", {}, "My answer is yes.", "Perhaps."),
  ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello.\nP.S. Bye.", "Hello."),
  ("detectable_content:number_placeholders", {"num_placeholders": 1}, "Dear [name],", "Dear friend,"),
  ("change_case:english_lowercase", {}, "all in lower case.", "Not All Lower."),
  ("change_case:english_capital", {}, "ALL IN CAPITALS.", "Not all capitals."),
  ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
   "HELLO BIG world", "hello world"),
  ("startend:quotation", {}, '"Quoted answer."', "Unquoted answer."),
  ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?", "Done."),
  ("punctuation:no_comma", {}, "No commas here.", "Yes, a comma."),
  ("combination:repeat_prompt", {"prompt_to_repeat": "Name the shape."}, "Name the shape. A circle.",
   "A circle."),
  ("combination:two_responses", {}, "A circle.\n******\nA round shape.", "A circle."),
  ("language:response_language", {"language": "en"},
   "The picture shows three red circles and a blue square on a white table.",
   "Das Bild zeigt drei rote Kreise und ein blaues Quadrat auf einem weißen Tisch."),
]


@pytest.mark.parametrize("instruction,kwargs,good,bad", CASES, ids=[c[0] for c in CASES])
def test_each_instruction_type(instruction, kwargs, good, bad):
  fn = registry.build("ifeval")
  sample = {"id": "q", "prompt": kwargs.get("prompt_to_repeat", "Describe the picture."),
            "instruction_id_list": [instruction], "kwargs": [kwargs]}
  assert fn([sample, sample], [good, bad]).tolist() == [1.0, 0.0]


def test_all_types_covered():
  from keye_jax.evaluate import ifeval
  assert sorted(c[0] for c in CASES) == ifeval.instruction_ids()


def test_several_constraints_strict_loose_fraction_and_thinking():
  sample = {"prompt": "Describe it.", "instruction_id_list": ["change_case:english_lowercase",
                                                             "punctuation:no_comma"], "kwargs": [{}, {}]}
  half = "a red circle, and a blue square."       # lower case, but a comma
  assert registry.build("ifeval")([sample], [half]).tolist() == [0.0]
  assert registry.build("ifeval", score="fraction")([sample], [half]).tolist() == [0.5]
  # loose forgives a first line (a preamble) the strict check counts
  preamble = "Sure, HERE IT IS:\na red circle and a blue square."
  assert registry.build("ifeval", mode="strict")([sample], [preamble]).tolist() == [0.0]
  assert registry.build("ifeval", mode="loose")([sample], [preamble]).tolist() == [1.0]
  # the thinking trace is not checked
  assert registry.build("ifeval")([sample], ["<think>Hmm, Let Me See.</think>a red circle"]).tolist() == [1.0]
  assert registry.build("ifeval")([{"prompt": "x"}], ["anything"]).tolist() == [0.0]  # no constraints
  with pytest.raises(ValueError, match="unknown IFEval instruction id 'made:up'"):
    registry.build("ifeval")([{"instruction_id_list": ["made:up"], "kwargs": [{}]}], ["x"])
