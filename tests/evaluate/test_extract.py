"""Answer extraction on a table of tricky outputs."""

import pytest

from keye_jax.evaluate.extract import extract_choice, extract_number, final_answer, last_boxed, match_open
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
    ("The speed is 5 m/s after 10 s", 10.0),
    ("Final answer: -4.5 degrees", -4.5),
    ("no number", None),
])
def test_extract_number(text, want):
  assert extract_number(text) == pytest.approx(want) if want is not None else extract_number(text) is None


def test_boxed_final_answer_and_open_matching():
  assert last_boxed("a \\boxed{x^{2}} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
  assert final_answer("<think>paris?</think>The answer is Lyon.") == "Lyon"
  assert match_open("The answer is Paris.", "paris")
  assert match_open("x = 3.14159", "3.14")                 # numbers to 1%
  assert match_open("About 25", ["24/7", "25.0"])          # any accepted answer
  assert not match_open("Lyon", "Paris")
  assert not match_open("It is 31.4", "3.14")


def test_thinking_split():
  assert split_thinking("<think>\nlet me see\n</think>\n\nB") == ("let me see", "B")
  assert split_thinking("plain answer") == ("", "plain answer")
