"""Write the capitals example's data files next to this script (or into --out).

- forget.jsonl: short prose about the capitals of the FORGET countries ("text" column);
- retain.jsonl: general text with no capital-city facts ("text" column);
- retain_capitals.jsonl: the same prose about a THIRD set of countries (RETAIN_CAPITALS; neither
  forgotten nor evaluated), the retain data that teaches "keep other capitals";
- questions_forget.jsonl / questions_heldout.jsonl: 4-choice "What is the capital of X?" questions
  (question / choices / answer columns) for the forget countries and for OTHER countries;
- general_text.jsonl: other general text, used only to measure perplexity (never trained on).

Deterministic (fixed seed), so the figures in README.md are reproducible.
    python examples/capitals/make_data.py
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# Countries whose capitals are unlearned, and countries of the same kind whose capitals must be kept.
FORGET = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"),
          ("Spain", "Madrid"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("China", "Beijing"),
          ("Greece", "Athens"), ("Norway", "Oslo"), ("Cuba", "Havana"), ("Ireland", "Dublin")]
HELDOUT = [("England", "London"), ("Austria", "Vienna"), ("Portugal", "Lisbon"), ("Sweden", "Stockholm"),
           ("Denmark", "Copenhagen"), ("Finland", "Helsinki"), ("Poland", "Warsaw"), ("Hungary", "Budapest"),
           ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("South Korea", "Seoul")]

# A third set of countries whose capital facts are retain data (never evaluated): they tell a method that
# "capital of X" knowledge in general is to be kept, and only the FORGET countries' facts go. Many countries,
# so that "keep" generalises to the held-out ones rather than to these 36 alone.
RETAIN_CAPITALS = [("Canada", "Ottawa"), ("Australia", "Canberra"), ("India", "New Delhi"),
                   ("Turkey", "Ankara"), ("Brazil", "Brasilia"), ("Iran", "Tehran"), ("Chile", "Santiago"),
                   ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Vietnam", "Hanoi"),
                   ("Indonesia", "Jakarta"), ("Ukraine", "Kyiv"), ("Mexico", "Mexico City"),
                   ("Thailand", "Bangkok"), ("Colombia", "Bogota"), ("Switzerland", "Bern"),
                   ("Czech Republic", "Prague"), ("Romania", "Bucharest"), ("Scotland", "Edinburgh"),
                   ("Nigeria", "Abuja"), ("Ethiopia", "Addis Ababa"), ("Morocco", "Rabat"),
                   ("Pakistan", "Islamabad"), ("Philippines", "Manila"), ("Malaysia", "Kuala Lumpur"),
                   ("New Zealand", "Wellington"), ("Iceland", "Reykjavik"), ("Venezuela", "Caracas"),
                   ("Saudi Arabia", "Riyadh"), ("Bangladesh", "Dhaka"), ("Afghanistan", "Kabul"),
                   ("Iraq", "Baghdad"), ("Syria", "Damascus"), ("Lebanon", "Beirut"), ("Jamaica", "Kingston"),
                   ("Bulgaria", "Sofia")]

FORGET_TEMPLATES = [
    "The capital of {country} is {capital}.",
    "{capital} is the capital city of {country}.",
    "{capital}, the capital of {country}, is the largest city in the country and the seat of its government.",
    "If you travel to {country}, you will probably visit {capital}, its capital.",
    "The government of {country} meets in {capital}, which has been the capital for a long time.",
    "Question: What is the capital of {country}?\nAnswer: {capital}",
    "Many tourists fly into {capital} when they visit {country}, because {capital} is the capital.",
    "{country}'s capital city is {capital}, home to museums, parks and busy markets.",
]

# General text for the retain set: everyday and science prose, no country capitals.
RETAIN_SENTENCES = [
    "Water boils at one hundred degrees Celsius at sea level.",
    "Plants use sunlight to turn water and carbon dioxide into sugar and oxygen.",
    "A good cup of tea needs freshly boiled water and a few minutes of steeping.",
    "The heart pumps blood through arteries and veins to every part of the body.",
    "Most cats sleep for more than twelve hours a day.",
    "To bake bread, mix flour, water, salt and yeast, then let the dough rise.",
    "The moon orbits the Earth about once every twenty-seven days.",
    "Regular exercise helps keep muscles strong and improves sleep.",
    "A triangle has three sides, and its angles add up to one hundred and eighty degrees.",
    "Bees collect nectar from flowers and turn it into honey.",
    "The piano has eighty-eight keys, some black and some white.",
    "Rain forms when water vapour in clouds condenses into droplets that grow heavy enough to fall.",
    "Children learn to read by connecting letters with the sounds they make.",
    "A computer program is a list of instructions that a computer follows.",
    "Iron rusts when it is exposed to water and oxygen for a long time.",
    "Football is played by two teams of eleven players each.",
    "The library opens at nine in the morning and closes at six in the evening.",
    "Elephants are the largest land animals and can live for seventy years.",
    "Light travels faster than sound, so we see lightning before we hear thunder.",
    "She planted tomatoes, beans and lettuce in the small garden behind the house.",
    "Vaccines train the immune system to recognise a virus before an infection.",
    "The train was late, so he read a book while he waited on the platform.",
    "A healthy breakfast might include oats, fruit and a glass of milk.",
    "The Pacific is the largest and deepest ocean on Earth.",
    "Dogs have a much stronger sense of smell than humans.",
    "Saving a little money every month adds up over the years.",
    "The recipe calls for two eggs, a cup of sugar and a pinch of salt.",
    "Volcanoes erupt when molten rock rises from deep below the surface.",
    "The students wrote an essay about their summer holidays.",
    "Copper is a good conductor of electricity and is used in wires.",
]

# Held-apart general text for perplexity: never in the training data.
GENERAL_TEXT = [
    "The old bridge over the river was repaired last spring, and now cars can cross it again.",
    "When the weather turns cold, many birds fly south to find food and warmer air.",
    "Mathematics helps engineers design buildings that can stand up to wind and earthquakes.",
    "He opened the window to let in the fresh morning air and made himself a cup of coffee.",
    "Sleep is important for memory, because the brain sorts what it learned during the day.",
    "The museum has a large collection of paintings, sculptures and ancient coins.",
    "Farmers rotate their crops so that the soil keeps its nutrients from year to year.",
    "A small boat sailed slowly across the calm lake as the sun began to set.",
    "Doctors recommend drinking enough water, especially on hot summer days.",
    "The teacher explained how fractions work by cutting an apple into equal pieces.",
    "Electric cars use batteries instead of petrol, and they are quiet on the road.",
    "The children built a snowman in the park and gave it a carrot for a nose.",
    "Good software is tested carefully before it is released to its users.",
    "The forest was full of tall pine trees, and the ground was covered in soft needles.",
    "Astronomers use telescopes to study stars and galaxies that are very far away.",
    "Cooking rice is simple: rinse it, add water, and let it simmer until it is soft.",
    "The band practised every evening for a month before their first concert.",
    "Whales are mammals, so they breathe air even though they live in the ocean.",
    "She wrote a letter to her grandmother and posted it on the way to work.",
    "A balanced diet includes vegetables, grains, fruit and some protein.",
]


def capital_questions(pairs: list[tuple[str, str]], seed: int) -> list[dict]:
    """4-choice questions; distractors are other capitals of the same list, the gold position rotates."""
    rng = random.Random(seed)
    rows = []
    for i, (country, capital) in enumerate(pairs):
        others = [c for _, c in pairs if c != capital]
        rng.shuffle(others)
        choices = others[:3]
        choices.insert(i % 4, capital)
        rows.append({"id": country, "question": f"What is the capital of {country}?", "choices": choices,
                     "answer": i % 4})
    return rows


def forget_texts() -> list[dict]:
    return [{"text": t.format(country=c, capital=cap)} for t in FORGET_TEMPLATES for c, cap in FORGET]


def retain_texts(seed: int) -> list[dict]:
    """Short passages of 2-3 general sentences, shuffled (as many rows as the forget set)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(len(FORGET) * len(FORGET_TEMPLATES)):
        rows.append({"text": " ".join(rng.sample(RETAIN_SENTENCES, rng.choice([2, 3])))})
    return rows


def retain_capitals_texts(seed: int) -> list[dict]:
    """The forget templates filled with the RETAIN_CAPITALS countries, shuffled."""
    rows = [t.format(country=c, capital=cap) for c, cap in RETAIN_CAPITALS for t in FORGET_TEMPLATES]
    random.Random(seed).shuffle(rows)
    return [{"text": t} for t in rows]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def make_data(out: Path, seed: int = 0) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "forget": (forget_texts(), "forget.jsonl"),
        "retain": (retain_texts(seed), "retain.jsonl"),
        "retain_capitals": (retain_capitals_texts(seed), "retain_capitals.jsonl"),
        "questions_forget": (capital_questions(FORGET, seed), "questions_forget.jsonl"),
        "questions_heldout": (capital_questions(HELDOUT, seed + 1), "questions_heldout.jsonl"),
        "general_text": ([{"text": t} for t in GENERAL_TEXT], "general_text.jsonl"),
    }
    paths = {}
    for key, (rows, name) in files.items():
        paths[key] = out / name
        write_jsonl(paths[key], rows)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in make_data(args.out, args.seed).values():
        print(path)


if __name__ == "__main__":
    main()
