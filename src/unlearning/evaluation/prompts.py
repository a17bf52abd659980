"""Prompt formats, built exactly as lm-evaluation-harness builds them (zero- and few-shot).

Two formats, each a ``(context, continuations)`` pair per question; the model scores every
continuation given the context:

* **letter** (lm-eval's ``wmdp_bio`` / ``mmlu`` tasks)::

      The following are multiple choice questions (with answers) about {subject}.\\n\\n
      {question.strip()}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:

  continuations ``" A" " B" " C" " D"`` (lm-eval's ``target_delimiter`` " " + choice letter).

* **cloze**, the question format (lm-eval's ``*_continuation`` tasks and the notebook's
  ``correct_prob``)::

      Question: {question.strip()}\\nAnswer:

  continuations ``" " + choice_text`` for every choice.

In lm-eval the zero-shot context is ``description + doc_to_text(doc)`` (the task description is
its "system" message, joined with no delimiter), and each continuation is
``target_delimiter + choice``. MMLU subject names reach the header with underscores as spaces.

Few-shot (lm-eval 0.4.13 ``ConfigurableTask.fewshot_context`` / ``build_qa_turn``, plain text, no
chat template): ``description + example_1 + ... + example_k + doc_to_text(doc)``, each example
``doc_to_text(example) + target_delimiter + its answer + fewshot_delimiter`` (the answer is the
letter in the letter format, the choice's text in the question format; the delimiters are " " and
"\n\n"). Which examples is the task's business (MMLU: the first k dev rows of the subject).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

LETTERS = ("A", "B", "C", "D")
TARGET_DELIMITER = " "  # lm-eval's default ``target_delimiter``
FEWSHOT_DELIMITER = "\n\n"  # lm-eval's default ``fewshot_delimiter``
FORMATS = ("letter", "cloze")


def subject_header(subject: str) -> str:
    """The WMDP / MMLU task description, e.g. ``...about high school biology.\\n\\n``."""
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def letter_question(question: str, choices: Sequence[str]) -> str:
    """lm-eval's ``doc_to_text`` of WMDP and MMLU (four choices, A to D)."""
    if len(choices) != len(LETTERS):
        raise ValueError(f"the letter format has exactly {len(LETTERS)} choices, got {len(choices)}")
    lines = [question.strip()]
    lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices)]
    return "\n".join(lines) + "\nAnswer:"


def cloze_question(question: str) -> str:
    """lm-eval's ``doc_to_text`` of the question (continuation) format."""
    return f"Question: {question.strip()}\nAnswer:"


class Example(Protocol):
    """A solved question shown before the asked one (``MCQuestion`` is one)."""
    question: str
    choices: Sequence[str]
    answer: int


def fewshot_block(format: str, examples: Sequence[Example]) -> str:
    """The solved examples, each ``question + " " + answer + "\n\n"`` (lm-eval's few-shot turns)."""
    parts = []
    for ex in examples:
        if format == "letter":
            parts.append(letter_question(ex.question, ex.choices) + TARGET_DELIMITER + LETTERS[ex.answer])
        elif format == "cloze":
            parts.append(cloze_question(ex.question) + TARGET_DELIMITER + ex.choices[ex.answer])
        else:
            raise ValueError(f"format: {format!r} is not known; choose one of {', '.join(FORMATS)}")
    return "".join(part + FEWSHOT_DELIMITER for part in parts)


def letter_prompt(question: str, choices: Sequence[str], subject: str,
                  description: str | None = None, fewshot: Sequence[Example] = ()) -> tuple[str, list[str]]:
    """``(context, continuations)`` of one letter-format question (after ``fewshot`` examples)."""
    if description is None and not subject:
        raise ValueError("the letter format needs a subject for its header (or an explicit description)")
    header = subject_header(subject) if description is None else description
    context = header + fewshot_block("letter", fewshot) + letter_question(question, choices)
    return context, [TARGET_DELIMITER + letter for letter in LETTERS[:len(choices)]]


def cloze_prompt(question: str, choices: Sequence[str], description: str | None = None,
                 fewshot: Sequence[Example] = ()) -> tuple[str, list[str]]:
    """``(context, continuations)`` of one question-format item (no header unless given)."""
    context = (description or "") + fewshot_block("cloze", fewshot) + cloze_question(question)
    return context, [TARGET_DELIMITER + choice for choice in choices]


def build_prompt(format: str, question: str, choices: Sequence[str], subject: str = "",
                 description: str | None = None, fewshot: Sequence[Example] = ()) -> tuple[str, list[str]]:
    """Dispatch on the task format: ``letter`` or ``cloze``."""
    if format == "letter":
        return letter_prompt(question, choices, subject, description, fewshot)
    if format == "cloze":
        return cloze_prompt(question, choices, description, fewshot)
    raise ValueError(f"format: {format!r} is not known; choose one of {', '.join(FORMATS)}")
