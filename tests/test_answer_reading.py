"""`answers.extract` read as a person reads a reply: a table of replies modelled on what
models write (letters first, last or in between, explanations naming other options'
letters and texts, full-width punctuation, markdown, refusals). Each row is (reply, the
option a careful reader takes, None where a reader finds no single choice)."""

import pytest

from atlas_jax import answers

OPTIONS = tuple(zip("ABCD", ["red", "blue", "green", "yellow"]))

TABLE = [
    # The letter first, then an explanation.
    ("B. The red segment is much shorter than the other one, so it cannot be the longest "
     "one in this picture.", "B"),
    ("C. The green segment is longer than the red one, so A is not right.", "C"),
    ("(B) Blue, because the blue bar reaches higher than the red and green bars.", "B"),
    ("B: the blue square sits to the left of the yellow one.", "B"),
    ("B) blue", "B"),
    ("D - yellow is the colour on the left after the flip.", "D"),
    ("Answer: B. The red one is shorter, as option A shows.", "B"),
    ("**B**\n\nThe blue line is the longest of the four.", "B"),
    ("**B.** Blue is correct; red (A) and green (C) are shorter.", "B"),
    ("# A\nThe red segment is the longest.", "A"),
    ("Option C. Green is the only colour that appears twice.", "C"),
    ("(c) green, since the others are shorter", "C"),
    ("A. Red. B and C are both shorter.", "A"),
    # Full-width forms.
    ("Ｂ．青い線が一番長いです。", "B"),
    ("（Ｃ）緑", "C"),
    ("答え：Ｄ", "D"),
    ("The answer is Ｃ。", "C"),
    # A commitment anywhere wins over letters the explanation names.
    ("The answer is B. A is wrong because the red line is short, and C is wrong too.", "B"),
    ("Final answer: (D). Options A, B and C do not match the picture.", "D"),
    ("I choose A, since the red segment is clearly the longest; B and C are shorter.", "A"),
    ("The correct option is C, not B.", "C"),
    ("Looking at the image, the best answer would be D.", "D"),
    ("**Answer:** B", "B"),
    ("B. Wait, no: the answer is C.", "C"),
    ("B. On second thought, C.", "C"),
    # The letter last.
    ("The red segment is short and the blue one long, so B.", "B"),
    ("Comparing the lengths of all four segments carefully, I get (A)", "A"),
    ("A cat sits next to the red square. So B.", "B"),
    ("I think the answer is C", "C"),
    ("D", "D"),
    ("(b)", "B"),
    # An option's text without a letter.
    ("It is blue.", "B"),
    ("The longest line is the yellow one.", "D"),
    ("\\boxed{green}", "C"),
    ("So the final answer is \\boxed{A}.", "A"),
    ("Red looks long at first, but \\boxed{B} is longer.", "B"),
    # No single choice: a failure, not a guess.
    ("It could be A or B.", None),
    ("Either B or C, hard to tell from the image.", None),
    ("red or blue, hard to say", None),
    ("I cannot answer this question from the image.", None),
    ("I'm sorry, but I can't help with that.", None),
    ("A and B are both plausible here.", None),
    ("\\boxed{purple}", None),
    ("", None),
    ("Let me think step by step about the lengths of the segments in the picture.", None),
]


def test_the_table_is_large_enough():
  assert len(TABLE) >= 40


@pytest.mark.parametrize("reply, expected", TABLE)
def test_a_reply_is_read_as_a_reader_reads_it(reply, expected):
  assert answers.extract(reply, OPTIONS)[0] == expected


def test_an_opening_letter_is_not_taken_from_an_article_or_a_pronoun():
  assert answers.opening_letter("A red segment is drawn. So B.", "ABCD") is None
  assert answers.opening_letter("I think so.", "ABCDEFGHI") is None
  assert answers.extract("A red segment is drawn. So B.", OPTIONS)[0] == "B"
