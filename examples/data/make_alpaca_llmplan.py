"""Writes alpaca_llmplan.jsonl: a small Alpaca-style instruction data set written for llmplan (CC0-1.0).

Deterministic: the same file on every run (`python examples/data/make_alpaca_llmplan.py`). Part of it is
computed here (arithmetic, unit conversions, sorting, strings, numbers, Python expressions: every answer is
computed by this script, not typed), the rest is written by hand in HANDWRITTEN below. No record is copied
from another data set.
"""

from __future__ import annotations

import json
import math
import random
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from pathlib import Path

OUT = Path(__file__).with_name("alpaca_llmplan.jsonl")
SEED = 20261201


def record(instruction: str, output: str, input: str = "") -> dict[str, str]:
    return {"instruction": instruction, "input": input, "output": output}


def number(value: Fraction | float | int) -> str:
    """An integer as is, anything else to at most two decimals (no trailing zeros)."""
    if Fraction(value).denominator == 1:
        return f"{int(value):,}"
    return f"{float(value):,.2f}".rstrip("0").rstrip(".")


# ---- arithmetic ---------------------------------------------------------------------------------
def arithmetic(rng: random.Random) -> list[dict[str, str]]:
    items = []
    for _ in range(8):
        a, b = rng.randint(12, 999), rng.randint(12, 999)
        items.append(record(f"What is {a} + {b}?", f"{a} + {b} = {a + b}."))
    for _ in range(6):
        a, b = sorted((rng.randint(10, 500), rng.randint(10, 500)), reverse=True)
        items.append(record(f"Subtract {b} from {a}.", f"{a} - {b} = {a - b}."))
    for _ in range(8):
        a, b = rng.randint(3, 99), rng.randint(3, 30)
        items.append(record(f"Multiply {a} by {b}.", f"{a} × {b} = {a * b}."))
    for _ in range(5):
        b = rng.randint(3, 12)
        a = b * rng.randint(3, 20) + rng.randint(1, b - 1)
        q, r = divmod(a, b)
        items.append(record(
            f"What is {a} divided by {b}?",
            f"{a} divided by {b} is {q} with a remainder of {r}, or {approx(Fraction(a, b))} as a decimal.",
        ))
    for pct, base in [(10, 90), (25, 36), (20, 45), (75, 40), (5, 60), (50, 130), (15, 80), (12, 250)]:
        value = Fraction(pct, 100) * base
        items.append(record(f"What is {pct}% of {base}?", f"{pct}% of {base} is {number(value)}."))
    for n in (13, 17, 21, 25):
        items.append(record(f"What is the square of {n}?", f"The square of {n} is {n} × {n} = {n * n}."))
    for n in (49, 144, 225):
        items.append(record(f"What is the square root of {n}?", f"The square root of {n} is {math.isqrt(n)}."))
    return items


def word_problems() -> list[dict[str, str]]:
    problems = [
        ("Maya has 12 apples and buys 7 more. How many apples does she have now?",
         f"Maya has 12 + 7 = {12 + 7} apples."),
        ("A box holds 24 pencils. How many pencils are in 6 boxes?",
         f"6 boxes hold 6 × 24 = {6 * 24} pencils."),
        ("Tom reads 15 pages a day. How many days does he need for a 180-page book?",
         f"He needs 180 ÷ 15 = {180 // 15} days."),
        ("A shirt costs $40 and is on sale for 25% off. What is the sale price?",
         f"25% of $40 is $10, so the sale price is $40 - $10 = ${40 - 10}."),
        ("A train leaves at 9:45 and the trip takes 2 hours and 30 minutes. When does it arrive?",
         "It arrives at 12:15 (9:45 plus 2 hours is 11:45, plus 30 minutes is 12:15)."),
        ("Three friends share a $54 bill equally. How much does each pay?",
         f"Each pays $54 ÷ 3 = ${54 // 3}."),
        ("A rectangle is 8 cm long and 5 cm wide. What is its area?",
         f"The area is 8 cm × 5 cm = {8 * 5} square centimeters."),
        ("A rectangle is 8 cm long and 5 cm wide. What is its perimeter?",
         f"The perimeter is 2 × (8 cm + 5 cm) = {2 * (8 + 5)} cm."),
        ("A car uses 6 liters of fuel per 100 km. How much fuel does it need for 350 km?",
         f"It needs 350 ÷ 100 × 6 = {number(Fraction(350, 100) * 6)} liters."),
        ("If a recipe for 4 people needs 300 g of flour, how much flour is needed for 6 people?",
         f"For 6 people you need 300 g ÷ 4 × 6 = {300 // 4 * 6} g of flour."),
    ]
    return [record(question, answer) for question, answer in problems]


# ---- unit conversions ---------------------------------------------------------------------------
KM_PER_MILE = Fraction(1609344, 1000000)  # international mile, exact
KG_PER_POUND = Fraction(45359237, 100000000)  # avoirdupois pound, exact
CM_PER_INCH = Fraction(254, 100)  # exact


def approx(value: Fraction) -> str:
    """The value to two decimals, "about" when that is not exact."""
    return ("" if (value * 100).denominator == 1 else "about ") + number(value)


def conversions() -> list[dict[str, str]]:
    items = []
    for km in (5, 10, 21, 42, 100):
        items.append(record(f"Convert {km} kilometers to miles.",
                            f"{km} kilometers is {approx(km / KM_PER_MILE)} miles (1 mile = 1.609344 km)."))
    for miles in (1, 3, 26, 60):
        items.append(record(f"How many kilometers are in {miles} mile{'s' if miles > 1 else ''}?",
                            f"{miles} mile{'s' if miles > 1 else ''} is {approx(miles * KM_PER_MILE)} kilometers."))
    for kg in (1, 5, 70):
        items.append(record(f"Convert {kg} kilogram{'s' if kg > 1 else ''} to pounds.",
                            f"{kg} kilogram{'s' if kg > 1 else ''} is {approx(kg / KG_PER_POUND)} pounds."))
    for lb in (10, 150):
        items.append(record(f"How many kilograms is {lb} pounds?",
                            f"{lb} pounds is {approx(lb * KG_PER_POUND)} kilograms (1 pound = 0.45359237 kg)."))
    for c in (-10, 0, 25, 37, 100):
        f = Fraction(c) * 9 / 5 + 32
        items.append(record(f"Convert {c} degrees Celsius to Fahrenheit.",
                            f"{c} °C is {number(f)} °F (multiply by 9/5, then add 32)."))
    for f in (32, 50, 68, 212):
        c = (Fraction(f) - 32) * 5 / 9
        items.append(record(f"What is {f} degrees Fahrenheit in Celsius?",
                            f"{f} °F is {number(c)} °C (subtract 32, then multiply by 5/9)."))
    for inch in (1, 12, 30):
        items.append(record(f"How many centimeters are in {inch} inch{'es' if inch > 1 else ''}?",
                            f"{inch} inch{'es' if inch > 1 else ''} is {approx(inch * CM_PER_INCH)} centimeters."))
    for cm in (100, 180):
        items.append(record(f"Convert {cm} centimeters to inches.",
                            f"{cm} centimeters is {approx(cm / CM_PER_INCH)} inches (1 inch = 2.54 cm)."))
    for hours in (3, 8):
        items.append(record(f"How many minutes are in {hours} hours?", f"{hours} hours is {hours * 60} minutes."))
    for minutes in (135, 250):
        h, m = divmod(minutes, 60)
        items.append(record(f"Express {minutes} minutes in hours and minutes.",
                            f"{minutes} minutes is {h} hours and {m} minutes."))
    for liters in (2, 0.75):
        items.append(record(f"How many milliliters are in {liters} liters?",
                            f"{liters} liters is {number(Fraction(str(liters)) * 1000)} milliliters."))
    items.append(record("Convert 3.5 meters to centimeters.", "3.5 meters is 350 centimeters."))
    items.append(record("How many kilograms are 2,500 grams?", "2,500 grams is 2.5 kilograms."))
    return items


# ---- lists and strings ----------------------------------------------------------------------------
SORT_NUMBERS = [
    ("Sort these numbers from smallest to largest.", False),
    ("Arrange the following numbers in ascending order.", False),
    ("Put these numbers in descending order.", True),
    ("Order the numbers below from largest to smallest.", True),
    ("List these numbers in increasing order.", False),
    ("Sort the following values in decreasing order.", True),
]
SORT_WORDS = [
    ("Sort these words alphabetically.", ["pear", "apple", "mango", "cherry", "banana"], False),
    ("Put the following words in alphabetical order.", ["river", "cloud", "mountain", "desert", "forest"], False),
    ("Arrange these words in reverse alphabetical order.", ["violin", "drum", "flute", "piano", "guitar"], True),
    ("Alphabetize the list below.", ["Tuesday", "Monday", "Sunday", "Friday", "Wednesday"], False),
]


def lists(rng: random.Random) -> list[dict[str, str]]:
    items = []
    for instruction, descending in SORT_NUMBERS:
        values = rng.sample(range(1, 200), rng.randint(5, 8))
        ordered = sorted(values, reverse=descending)
        items.append(record(instruction, ", ".join(map(str, ordered)), ", ".join(map(str, values))))
    for instruction, words, descending in SORT_WORDS:
        items.append(record(instruction, ", ".join(sorted(words, reverse=descending)), ", ".join(words)))
    for _ in range(3):
        values = rng.sample(range(-50, 300), 6)
        items.append(record(f"Which is the largest number in {', '.join(map(str, values))}?",
                            f"The largest number is {max(values)}."))
    for _ in range(3):
        values = rng.sample(range(-50, 300), 6)
        items.append(record(f"Find the smallest number among {', '.join(map(str, values))}.",
                            f"The smallest number is {min(values)}."))
    for values in ([4, 8, 15, 16, 23, 42], [10, 20, 30, 40], [7, 3, 9, 5]):
        mean = Fraction(sum(values), len(values))
        items.append(record(f"What is the average of {', '.join(map(str, values))}?",
                            f"The average is {sum(values)} ÷ {len(values)} = {number(mean)}."))
    return items


def strings() -> list[dict[str, str]]:
    items = []
    for word in ("planet", "keyboard", "llama", "sunflower", "python", "stressed", "window", "orange"):
        items.append(record(f'Reverse the string "{word}".', f'"{word[::-1]}"'))
    for word in ("banana", "education", "rhythm", "queue", "strawberry", "aeroplane"):
        vowels = [c for c in word if c in "aeiou"]
        if vowels:
            answer = f'"{word}" has {len(vowels)} vowel{"s" if len(vowels) != 1 else ""}: {", ".join(vowels)}.'
        else:
            answer = f'"{word}" has no vowels (a, e, i, o, u); it uses y instead.'
        items.append(record(f'How many vowels (a, e, i, o, u) are in the word "{word}"?', answer))
    for word in ("elephant", "computer", "Mississippi", "cat"):
        items.append(record(f'How many letters are in the word "{word}"?', f'"{word}" has {len(word)} letters.'))
    letter_counts = [("s", "Mississippi"), ("r", "strawberry"), ("e", "excellence")]
    for letter, word in letter_counts:
        n = word.lower().count(letter)
        items.append(record(f'How many times does the letter "{letter}" appear in "{word}"?',
                            f'The letter "{letter}" appears {n} times in "{word}".'))
    for phrase in ("good morning", "read the manual first"):
        items.append(record(f'Write "{phrase}" in capital letters.', phrase.upper()))
    sentences = [
        ("Count the words in this sentence.", "The quick brown fox jumps over the lazy dog."),
        ("How many words does the following text contain?", "Plans are worthless, but planning is everything."),
        ("Tell me the number of words in the sentence below.", "Small steps every day add up to big results."),
    ]
    for instruction, sentence in sentences:
        items.append(record(instruction, f"It has {len(sentence.split())} words.", sentence))
    for word in ("level", "rotor", "planet", "racecar", "banana"):
        yes = word == word[::-1]
        items.append(record(f'Is "{word}" a palindrome?',
                            f'{"Yes" if yes else "No"}: "{word}" reversed is "{word[::-1]}".'))
    return items


# ---- numbers ------------------------------------------------------------------------------------
ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
       "sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def in_words(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + in_words(rest))
    rest = n % 1000
    joiner = " and " if 0 < rest < 100 else " "
    return in_words(n // 1000) + " thousand" + ("" if rest == 0 else joiner + in_words(rest))


def roman(n: int) -> str:
    table = [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"), (40, "XL"),
             (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]
    out = ""
    for value, letters in table:
        while n >= value:
            out, n = out + letters, n - value
    return out


def is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))


def numbers() -> list[dict[str, str]]:
    items = []
    for n in (47, 115, 1204, 3000, 90):
        items.append(record(f"Write the number {n} in words.", in_words(n).capitalize() + "."))
    for n in (14, 49, 1999, 2024, 444, 3888):
        items.append(record(f"Write {n} in Roman numerals.", f"{n} is {roman(n)} in Roman numerals."))
    for n in (29, 51, 97, 91, 2, 1):
        if is_prime(n):
            answer = f"Yes, {n} is prime: its only divisors are 1 and {n}."
        elif n == 1:
            answer = "No. 1 is not a prime number: a prime has exactly two divisors, 1 and itself."
        else:
            d = next(d for d in range(2, n) if n % d == 0)
            answer = f"No, {n} is not prime: {n} = {d} × {n // d}."
        items.append(record(f"Is {n} a prime number?", answer))
    for a, b in ((12, 18), (48, 36), (17, 5), (100, 75)):
        items.append(record(f"What is the greatest common divisor of {a} and {b}?",
                            f"The greatest common divisor of {a} and {b} is {math.gcd(a, b)}."))
    for a, b in ((4, 6), (3, 7)):
        items.append(record(f"What is the least common multiple of {a} and {b}?",
                            f"The least common multiple of {a} and {b} is {math.lcm(a, b)}."))
    for n in (38, 77, 1000):
        kind = "even" if n % 2 == 0 else "odd"
        why = "divisible by 2" if kind == "even" else "not divisible by 2"
        items.append(record(f"Is {n} even or odd?", f"{n} is {kind}: it is {why}."))
    for value, places in (("3.14159", 2), ("2.71828", 3), ("0.0456", 2)):
        rounded = Decimal(value).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
        items.append(record(f"Round {value} to {places} decimal places.",
                            f"{value} rounded to {places} decimal places is {rounded}."))
    for value in ("17.5", "248.49"):
        rounded = Decimal(value).quantize(Decimal(1), rounding=ROUND_HALF_UP)
        items.append(record(f"Round {value} to the nearest whole number.", f"{value} rounds to {rounded}."))
    return items


DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = ("January February March April May June July August September October November December").split()


def calendar() -> list[dict[str, str]]:
    items = []
    for start, ahead in (("Monday", 3), ("Friday", 4), ("Sunday", 10), ("Wednesday", 15)):
        day = DAYS[(DAYS.index(start) + ahead) % 7]
        items.append(record(f"What day of the week is {ahead} days after {start}?",
                            f"{ahead} days after {start} is {day}."))
    for month, ahead in (("October", 5), ("March", 7)):
        later = MONTHS[(MONTHS.index(month) + ahead) % 12]
        items.append(record(f"Which month comes {ahead} months after {month}?",
                            f"{ahead} months after {month} is {later}."))
    return items


# ---- Python -------------------------------------------------------------------------------------
PYTHON_EXPRESSIONS = [
    "7 // 2", "7 % 3", "2 ** 10", "len('hello world')", "'abc'.upper()", "sorted([3, 1, 2])",
    "list(range(4))", "'-'.join(['a', 'b', 'c'])", "[x * x for x in range(5)]", "'banana'.count('a')",
    "max([4, 9, 2])", "'Hello'[::-1]", "round(2.675, 1)", "10 / 4", "bool([])", "'python'[1:4]",
    "sum(range(1, 11))", "'a,b,c'.split(',')", "3 * 'ab'", "int('42') + 1",
]


def python_expressions() -> list[dict[str, str]]:
    items = []
    for expression in PYTHON_EXPRESSIONS:
        value = eval(expression, {"__builtins__": {"len": len, "sorted": sorted, "list": list, "range": range,
                                                   "max": max, "round": round, "bool": bool, "sum": sum,
                                                   "int": int}})
        items.append(record(f"What does the Python expression {expression} evaluate to?",
                            f"It evaluates to {value!r}."))
    return items


# ---- facts --------------------------------------------------------------------------------------
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Portugal", "Lisbon"), ("Greece", "Athens"),
    ("Poland", "Warsaw"), ("Ireland", "Dublin"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"),
    ("Mexico", "Mexico City"), ("South Korea", "Seoul"), ("Thailand", "Bangkok"), ("Austria", "Vienna"),
    ("Hungary", "Budapest"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Chile", "Santiago"),
    ("Brazil", "Brasília"), ("India", "New Delhi"), ("China", "Beijing"), ("the United Kingdom", "London"),
    ("New Zealand", "Wellington"),
]
CAPITAL_QUESTIONS = ["What is the capital of {}?", "Name the capital city of {}.", "Which city is the capital of {}?"]


def capitals() -> list[dict[str, str]]:
    return [
        record(CAPITAL_QUESTIONS[i % 3].format(country), f"The capital of {country} is {city}.")
        for i, (country, city) in enumerate(CAPITALS)
    ]


PLURALS = [
    ("The dog barks at the mailman.", "The dogs bark at the mailman."),
    ("The child plays in the garden.", "The children play in the garden."),
    ("The woman is reading a book.", "The women are reading a book."),
    ("The mouse hides under the table.", "The mice hide under the table."),
    ("The box was left by the door.", "The boxes were left by the door."),
    ("The leaf falls from the tree.", "The leaves fall from the tree."),
    ("This book is on the shelf.", "These books are on the shelf."),
    ("That tooth hurts.", "Those teeth hurt."),
    ("The student does her homework after dinner.", "The students do their homework after dinner."),
    ("The bus arrives at eight.", "The buses arrive at eight."),
    ("The goose swims across the pond.", "The geese swim across the pond."),
    ("A baby needs a lot of sleep.", "Babies need a lot of sleep."),
]


def plurals() -> list[dict[str, str]]:
    return [record(f'Rewrite the sentence "{one}" with a plural subject.', many) for one, many in PLURALS]


# ---- written by hand ----------------------------------------------------------------------------
HANDWRITTEN = [
    # definitions
    record("Define photosynthesis in one sentence.",
           "Photosynthesis is the process by which plants, algae and some bacteria use light energy to turn "
           "carbon dioxide and water into sugar and oxygen."),
    record("What is a prime number?",
           "A prime number is a whole number greater than 1 whose only divisors are 1 and itself, such as 2, 3, "
           "5, 7 and 11."),
    record("Explain the difference between a noun and a verb.",
           "A noun names a person, place, thing or idea (teacher, city, chair, freedom); a verb names an action "
           "or a state (run, think, is)."),
    record("What is an adjective? Give two examples.",
           "An adjective is a word that describes a noun, such as \"tall\" in \"a tall tree\" or \"quiet\" in "
           "\"a quiet room\"."),
    record("What is the difference between perimeter and area?",
           "Perimeter is the distance around the edge of a shape, measured in units of length such as meters. "
           "Area is the amount of surface the shape covers, measured in square units such as square meters."),
    record("What is a mammal?",
           "A mammal is a warm-blooded animal with hair or fur that feeds its young with milk; dogs, whales, "
           "bats and humans are mammals."),
    record("Define the word \"algorithm\".",
           "An algorithm is a finite, ordered list of steps that solves a problem or completes a task, such as "
           "a recipe or the method for long division."),
    record("What is a variable in programming?",
           "A variable is a name that refers to a value stored by a program, so the value can be used and "
           "changed later, for example count = 0."),
    record("Explain what a function is in programming.",
           "A function is a named block of code that takes inputs (arguments), does a task and can return a "
           "result, so the same steps can be reused without rewriting them."),
    record("What is the difference between the mean and the median?",
           "The mean is the sum of the values divided by how many there are. The median is the middle value "
           "when the values are sorted (or the average of the two middle values). The median is less affected "
           "by a few very large or very small values."),
    record("What is compound interest?",
           "Compound interest is interest calculated on both the original amount and the interest already "
           "added, so the balance grows faster over time than with simple interest."),
    record("What is evaporation?",
           "Evaporation is the change of a liquid into a gas at its surface, such as water drying from a puddle "
           "in the sun."),
    record("What is a synonym? Give an example.",
           "A synonym is a word with the same or nearly the same meaning as another word: \"big\" and "
           "\"large\" are synonyms."),
    record("What is an antonym? Give an example.",
           "An antonym is a word with the opposite meaning of another word: \"hot\" and \"cold\" are antonyms."),
    record("Explain the difference between a simile and a metaphor.",
           "A simile compares two things using \"like\" or \"as\" (\"her voice was like honey\"); a metaphor "
           "says one thing is another (\"her voice was honey\")."),
    record("What is a fraction?",
           "A fraction represents a part of a whole, written as a numerator over a denominator: 3/4 means "
           "three of four equal parts."),
    record("What is gravity?",
           "Gravity is the force by which masses attract each other; it keeps us on the ground and keeps the "
           "Moon in orbit around the Earth."),
    record("What does a thermometer measure?", "A thermometer measures temperature."),
    record("What is a budget?",
           "A budget is a plan for how much money you expect to earn and spend over a period, such as a month."),
    record("What is the water cycle?",
           "The water cycle is the continuous movement of water on Earth: water evaporates, condenses into "
           "clouds, falls as precipitation, and flows back into rivers, lakes and oceans."),
    # everyday facts
    record("How many days are there in a leap year?", "A leap year has 366 days."),
    record("How many minutes are in a day?", "A day has 24 × 60 = 1,440 minutes."),
    record("How many seconds are in an hour?", "An hour has 60 × 60 = 3,600 seconds."),
    record("How many hours are in a week?", "A week has 7 × 24 = 168 hours."),
    record("How many sides does a hexagon have?", "A hexagon has six sides."),
    record("At what temperature does water boil at sea level?",
           "At sea level, water boils at 100 °C (212 °F)."),
    record("At what temperature does water freeze?", "Pure water freezes at 0 °C (32 °F)."),
    record("How many planets are in our solar system?",
           "There are eight planets: Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune."),
    record("Which is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system."),
    record("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    record("What is the chemical formula of water?",
           "The chemical formula of water is H2O: two hydrogen atoms and one oxygen atom."),
    record("What is the chemical symbol for iron?", "The chemical symbol for iron is Fe."),
    record("How many bones are in the adult human body?", "An adult human body usually has 206 bones."),
    record("Which organ pumps blood through the body?", "The heart pumps blood through the body."),
    record("How many degrees are in a right angle?", "A right angle is 90 degrees."),
    record("What do the angles of a triangle add up to?", "The angles of a triangle add up to 180 degrees."),
    # procedures
    record("How do I boil an egg?",
           "1. Put the egg in a pot and cover it with cold water.\n2. Bring the water to a boil.\n3. Lower the "
           "heat and simmer: about 6 minutes for a soft yolk, 10 to 12 minutes for hard-boiled.\n4. Move the "
           "egg to cold water to stop the cooking, then peel it."),
    record("Give the steps to make a cup of tea with a tea bag.",
           "1. Boil fresh water.\n2. Put the tea bag in a cup and pour the hot water over it.\n3. Let it steep "
           "for 3 to 5 minutes.\n4. Remove the tea bag and add milk, sugar or lemon if you like."),
    record("How should I wash my hands properly?",
           "Wet your hands with clean water, apply soap, and scrub all surfaces (backs, between the fingers, "
           "under the nails) for at least 20 seconds. Rinse well and dry with a clean towel."),
    record("How do I plant a seed in a pot?",
           "Fill the pot with moist potting soil, press the seed in about two to three times as deep as the "
           "seed is wide, cover it lightly, water gently, and keep the pot in a warm, bright place with the "
           "soil damp but not soggy."),
    record("How can I keep a to-do list useful?",
           "Write tasks as concrete actions, put the most important three at the top, give deadlines where "
           "they matter, and review the list every morning, crossing off or removing what is done."),
    record("How do I change a light bulb safely?",
           "Switch off the light and let the old bulb cool. Stand on a stable step, unscrew or unclip the old "
           "bulb, fit a new bulb of the same type and wattage, then switch the light back on to test it."),
    record("How should I store leftover food?",
           "Let it cool for no more than two hours, put it in a sealed container in the refrigerator, and eat "
           "it within three to four days, reheating it until it is steaming hot."),
    record("Give three tips for preparing for a job interview.",
           "1. Research the company and the role.\n2. Prepare short examples of your past work that show the "
           "skills they ask for.\n3. Prepare a few questions to ask the interviewer, and plan your route so "
           "you arrive on time."),
    record("Suggest three ways to reduce food waste at home.",
           "1. Plan meals and shop with a list.\n2. Store food properly and eat the oldest items first.\n3. "
           "Turn leftovers into new meals, or freeze them before they spoil."),
    record("How do I save a document so I don't lose my work?",
           "Save early with a clear file name, then save often (Ctrl+S or Cmd+S). Keep a copy in a second "
           "place, such as cloud storage or an external drive."),
    # Python
    record("Write a Python function that checks whether a number is even.",
           "def is_even(n):\n    return n % 2 == 0"),
    record("Write a Python function that returns the factorial of n.",
           "def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result"),
    record("Write a Python function that reverses a string.", "def reverse(text):\n    return text[::-1]"),
    record("Write a Python function that returns the largest number in a list without using max().",
           "def largest(numbers):\n    best = numbers[0]\n    for n in numbers[1:]:\n        if n > best:\n"
           "            best = n\n    return best"),
    record("Write a Python function that counts the vowels in a string.",
           "def count_vowels(text):\n    return sum(1 for c in text.lower() if c in \"aeiou\")"),
    record("Write a Python loop that prints the numbers from 1 to 5.", "for i in range(1, 6):\n    print(i)"),
    record("How do I read a text file line by line in Python?",
           "with open(\"notes.txt\", encoding=\"utf-8\") as f:\n    for line in f:\n        print(line.rstrip())"),
    record("Write a Python function that converts Celsius to Fahrenheit.",
           "def celsius_to_fahrenheit(c):\n    return c * 9 / 5 + 32"),
    record("Fix the bug in this Python code.",
           "The condition uses the assignment operator = instead of the comparison operator ==. Corrected:"
           "\n\nfor n in numbers:\n    if n == 0:\n"
           "        print(\"zero\")",
           "for n in numbers:\n    if n = 0:\n        print(\"zero\")"),
    record("Explain what this Python code does.",
           "It builds a list of the squares of the even numbers from 0 to 9: [0, 4, 16, 36, 64].",
           "squares = [x * x for x in range(10) if x % 2 == 0]"),
    record("What is the difference between a list and a tuple in Python?",
           "A list is mutable: you can add, remove or change its items. A tuple is immutable: once created, "
           "its items cannot be changed. Lists use square brackets [1, 2], tuples parentheses (1, 2)."),
    # writing
    record("Write a one-sentence thank-you note to a neighbor who watered my plants.",
           "Thank you so much for watering my plants while I was away; they look wonderful and I really "
           "appreciate your kindness."),
    record("Write a short, polite email asking to move a meeting from Tuesday to Thursday.",
           "Subject: Moving our meeting to Thursday\n\nHi Sam,\n\nWould it be possible to move our Tuesday "
           "meeting to Thursday at the same time? Something urgent came up on Tuesday. Sorry for the change, "
           "and thank you for your flexibility.\n\nBest regards,\nAlex"),
    record("Write a haiku about rain.",
           "Soft rain on the roof\na slow drum for sleepy streets\npuddles hold the sky"),
    record("Suggest three names for a small neighborhood bakery.",
           "1. The Daily Crumb\n2. Corner Oven\n3. Rise and Shine Bakery"),
    record("Rewrite the following sentence in a more formal tone.",
           "Could you please send me the report by Friday?", "Hey, can you send me that report by Friday?"),
    record("Correct the grammar in the sentence below.",
           "She doesn't like apples, and neither do I.", "She don't like apples, and me neither."),
    record("Summarize the following paragraph in one sentence.",
           "Regular walking improves heart health, mood and sleep, and it costs nothing and needs no special "
           "equipment.",
           "Walking is one of the easiest ways to stay healthy. It strengthens the heart, improves mood and "
           "helps people sleep better. Unlike many sports, it needs no special equipment and costs nothing."),
    record("Classify the sentiment of this review as positive, negative or neutral.",
           "Positive.", "The hotel room was spotless and the staff were incredibly helpful."),
    record("Is the sentiment of the following message positive, negative or neutral?",
           "Negative.", "My order arrived two weeks late and the box was damaged."),
    record("Extract all the dates mentioned in the text.",
           "3 March, 14 April, 2 May",
           "The course starts on 3 March, the midterm is on 14 April and the final project is due on 2 May."),
    record("Make a shopping list from this recipe.",
           "- 200 g spaghetti\n- 2 cloves of garlic\n- 3 tablespoons of olive oil\n- chili flakes\n- parsley",
           "Cook 200 g of spaghetti. Fry 2 sliced cloves of garlic in 3 tablespoons of olive oil with chili "
           "flakes, toss with the pasta and finish with chopped parsley."),
    record("Turn these notes into a complete sentence.",
           "The team meeting has been moved to 3 pm on Friday in room 204.", "team meeting -> Fri 3pm, room 204"),
    record("Give a short title for the following text.",
           "Why Sleep Matters for Learning",
           "Students who sleep at least eight hours remember more of what they studied than students who stay "
           "up late, because the brain strengthens new memories during sleep."),
    record("Write a two-sentence description of a reusable water bottle for an online shop.",
           "Stay hydrated all day with this leak-proof, 750 ml stainless steel bottle that keeps drinks cold "
           "for 24 hours. It is dishwasher safe, free of BPA and light enough to carry anywhere."),
    record("Explain to a child why the sky is blue.",
           "Sunlight is made of all the colors. When it passes through the air, the tiny bits of air scatter "
           "blue light much more than red light, so blue light comes at us from every part of the sky."),
    record("Give one piece of advice for someone learning to cook.",
           "Start with a few simple recipes and make each one several times: repeating a dish teaches you more "
           "about timing and seasoning than trying something new every night."),
]


def build() -> list[dict[str, str]]:
    rng = random.Random(SEED)
    items = [
        *arithmetic(rng), *word_problems(), *conversions(), *lists(rng), *strings(), *numbers(), *calendar(),
        *python_expressions(), *capitals(), *plurals(), *HANDWRITTEN,
    ]
    random.Random(SEED).shuffle(items)
    seen: set[str] = set()
    for item in items:
        assert item["instruction"] not in seen, f"duplicate instruction: {item['instruction']}"
        seen.add(item["instruction"])
    return items


def main() -> None:
    items = build()
    with OUT.open("w", encoding="utf-8") as out:
        for item in items:
            if not item["input"]:
                item = {"instruction": item["instruction"], "output": item["output"]}
            out.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(f"{OUT}: {len(items)} records")


if __name__ == "__main__":
    main()
