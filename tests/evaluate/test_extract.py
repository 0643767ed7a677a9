"""Answer extraction on a table of tricky outputs. The cases marked "issue 19" were wrong before the fix
(D, None, None, 2.0, 10, a match, the reasoning's answer); MMMU's number rule is checked against its own
eval_utils.py definition (round to two decimals, then equality)."""

import pytest

from keye_jax.evaluate.extract import after_thinking, extract_choice, extract_number, final_answer, last_boxed, \
    match_open, numbers_match
from keye_jax.evaluate.scoring import is_correct
from keye_jax.generate import split_thinking

OPTS = ["dog", "cat", "red ball", "dark red ball"]
NUMS = ["1", "2", "3", "13"]

CHOICES = [
    ("A", OPTS, "A"),
    ("b", OPTS, "B"),
    ("(C) a cat", OPTS, "C"),
    ("The answer is B.", OPTS, "B"),
    ("Answer: **D**", OPTS, "D"),
    ("The correct answer is: (A) 2.5 m/s", OPTS, "A"),
    ("Best option:(B) cat", OPTS, "B"),
    ("B. The red one", OPTS, "B"),
    ("B is correct", OPTS, "B"),
    ("\\boxed{C}", OPTS, "C"),
    ("so we get $\\boxed{\\text{(D)}}$", OPTS, "D"),
    ("<think>Option A looks wrong, maybe B.</think>The answer is C", OPTS, "C"),
    ("<think>\nA? no. B? no.\n</think>\n\nD", OPTS, "D"),
    ("A cat is sitting on the mat.", OPTS, "B"),              # 'A' is the article, 'cat' the option text
    ("I think the answer is a cat", OPTS, "B"),               # 'I' the pronoun, 'a' the article
    ("I see a dark red ball", OPTS, "D"),                     # the longer option shadows 'red ball'
    ("It is a red ball.", OPTS, "C"),
    ("Neither A nor B; it is C.", OPTS, "C"),
    ("3", NUMS, "C"),
    ("13 apples", NUMS, "D"),
    ("The answer is E", OPTS, None),                         # not one of four options
    ("nothing useful here", OPTS, None),
    # issue 19: the stated answer outranks an option merely discussed; "X is correct"; lower case after "answer:"
    ("The answer is (B), since option D contradicts the premise.", OPTS, "B"),
    ("A is correct.", OPTS, "A"),
    ("answer: b", OPTS, "B"),
    ("Option A is tempting, but the answer is C.", OPTS, "C"),
    ("<think>The answer is B, surely", OPTS, None),          # unclosed <think>: no answer at all
    ("<think>\nhmm</think><think>The answer is B", OPTS, None),
]


@pytest.mark.parametrize("text,options,want", CHOICES)
def test_extract_choice(text, options, want):
  assert extract_choice(text, options) == want


@pytest.mark.parametrize("text,want", [
    ("The answer is 1,234.5", 1234.5),
    ("\\boxed{\\frac{3}{4}}", 0.75),
    ("so x = 3/4", 0.75),
    ("<think>maybe 7</think> It is 12%.", 12.0),
    ("about 2e-3 m", 0.002),
    ("The speed is 5 m/s after 10 s", 5.0),                  # issue 19: was 10 (the last number)
    ("The area is 45 cm^2.", 45.0),                           # issue 19: was 2.0 (the unit's exponent)
    ("The charge is 3.2 x 10^5 C.", 3.2e5),
    ("so q = 1.6 \\times 10^{-19} C", 1.6e-19),
    ("We count 12 apples and 3 pears, so the total is 15.", 15.0),
    ("<think>it is 7", None),                                  # unclosed <think>
    ("Final answer: -4.5 degrees", -4.5),
    ("no number", None),
])
def test_extract_number(text, want):
  assert extract_number(text) == pytest.approx(want) if want is not None else extract_number(text) is None


def test_boxed_final_answer_and_open_matching():
  assert last_boxed("a \\boxed{x^{2}} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
  assert final_answer("<think>paris?</think>The answer is Lyon.") == "Lyon"
  assert match_open("The answer is Paris.", "paris")
  assert match_open("x = 3.14159", "3.14")                 # MMMU: both rounded to two decimals
  assert match_open("About 25", ["24/7", "25.0"])          # any accepted answer
  assert not match_open("Lyon", "Paris")
  assert not match_open("It is 31.4", "3.14")


def test_thinking_split():
  assert split_thinking("<think>\nlet me see\n</think>\n\nB") == ("let me see", "B")
  assert split_thinking("plain answer") == ("", "plain answer")


def _mmmu_normalize(x: float) -> float:
  """MMMU eval_utils.normalize_str for a number: float(string.replace(',', '')) rounded to 2 decimals."""
  return round(float(str(x).replace(",", "")), 2)


@pytest.mark.parametrize("pred,gold", [(101, 100), (100.004, 100), (100.006, 100), (3.14159, 3.14), (3.146, 3.14),
                                       (0.001, 0.004), (0.005, 0.0), (-2.5, -2.5), (1234.5, 1234.5)])
def test_numbers_match_is_mmmu_rule(pred, gold):
  assert numbers_match(pred, gold) == (_mmmu_normalize(pred) == _mmmu_normalize(gold))
  assert not match_open("101", "100")                     # issue 19: accepted at 1% before


def test_unclosed_think_has_no_answer():
  assert after_thinking("<think>A or B? The answer is B") == ""
  assert after_thinking("reasoning</think> B") == "B"     # the template opened <think> in the prompt
  assert not match_open("<think>the answer is 12", "12")


@pytest.mark.parametrize("text,ref,kind,options,want", [
    ("The answer is (B), since option D contradicts it.", "B", "auto", None, True),
    ("It is a cat.", "cat", "choice", ["dog", "cat"], True),
    ("The area is 45 cm^2.", "45", "auto", None, True),
    ("x = 101", "100", "number", None, False),
    ("so \\boxed{\\frac{1}{2}}", "0.5", "auto", None, True),
    ("The answer is $\\frac{\\sqrt{2}}{2}$", "\\frac{1}{\\sqrt{2}}", "math", None, True),
    ("\\boxed{x^2 + 2x + 1}", "(x+1)^2", "math", None, True),
    ("\\boxed{x^2 + 1}", "(x+1)^2", "math", None, False),
    ("<think>so \\boxed{4}", "4", "math", None, False),
    ("The capital is Paris.", ["paris", "Paris, France"], "text", None, True),
    ("Lyon", "Paris", "auto", None, False),
])
def test_is_correct(text, ref, kind, options, want):
  assert is_correct(text, ref, kind, options) is want


def test_is_correct_rejects_unknown_kind():
  with pytest.raises(ValueError, match="unknown answer kind"):
    is_correct("A", "A", "letters")
