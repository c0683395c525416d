"""Conversations that test (and teach) memory: facts stated early, other talk, questions later.

Stdlib + NumPy: the evaluation (`cortex-edge eval chat-memory`) runs on the Pi's runtime; training
(cortex_edge/model/rows_train.py) draws its data from the same generator on other seeds.

A fact is a kind (a pet's name, a home town, a code, ...) with a value drawn at random, stated in one
of several wordings and asked about in one of several question forms. Each kind keeps its last
statement wording and its last question form out of training (`held_out`), and one whole kind of
other talk (HELD_OUT_TALK) never appears in training: the evaluation reports them separately.
Training draws seeds below HELD_OUT_SEED, evaluation at or above it.
What this leaves out: running a model (runtime/chat_memory.py, the training code).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HELD_OUT_SEED = 1_000_000

NAMES = ["Pixel", "Luna", "Biscuit", "Mango", "Oliver", "Ziggy", "Pepper", "Nimbus", "Clover", "Waffles", "Tango",
         "Juniper", "Marble", "Socks", "Rocket", "Hazel", "Sprout", "Domino", "Pickle", "Whiskers", "Noodle", "Comet",
         "Maple", "Bramble", "Cosmo", "Fudge", "Indigo", "Kiwi", "Olive", "Peanut"]
PEOPLE = ["Marta", "Tobias", "Ingrid", "Rafael", "Keiko", "Dmitri", "Amara", "Soren", "Lucia", "Henrik", "Priya",
          "Mateo", "Yusuf", "Greta", "Anselm", "Noor", "Callum", "Fatima", "Elias", "Rosalind"]
CITIES = ["Lisbon", "Nairobi", "Oslo", "Kyoto", "Lima", "Tallinn", "Hanoi", "Porto", "Quito", "Dakar", "Bergen",
          "Montreal", "Krakow", "Valencia", "Auckland", "Tbilisi", "Cusco", "Ghent", "Bilbao", "Adelaide"]
COLORS = ["teal", "crimson", "amber", "lilac", "olive green", "navy blue", "coral", "mustard yellow", "turquoise"]
FOODS = ["lasagna", "pad thai", "ramen", "paella", "falafel", "pierogi", "risotto", "tacos", "dumplings", "goulash"]
INSTRUMENTS = ["cello", "banjo", "trumpet", "harp", "ukulele", "clarinet", "accordion", "oboe", "mandolin"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def _code4(rng) -> str:
    return str(int(rng.integers(1000, 10000)))


def _code5(rng) -> str:
    return str(int(rng.integers(10000, 100000)))


def _date(rng) -> str:
    return f"{MONTHS[int(rng.integers(12))]} {int(rng.integers(1, 29))}"


def _pick(pool):
    return lambda rng: pool[int(rng.integers(len(pool)))]


@dataclass(frozen=True)
class Kind:
    name: str
    value: object  # rng -> str
    statements: tuple[str, ...]  # the last one is held out of training; the one before it puts the value first too
    questions: tuple[str, ...]  # the last one is held out of training


KINDS = (
    Kind("cat", _pick(NAMES), ("My cat is called {v}.", "I have a cat named {v}.", "Our cat's name is {v}.", "{v}, that is what we call our cat.",
                               "{v} is the name of my cat."),
         ("What is my cat called?", "What's the name of my cat?", "Do you remember my cat's name?",
          "Remind me, what did I say my cat is called?")),
    Kind("dog", _pick(NAMES), ("My sister's dog is named {v}.", "My sister has a dog called {v}.",
                               "The dog my sister owns is called {v}.", "{v}, that's the name of my sister's dog.", "{v} is what my sister named her dog."),
         ("What is my sister's dog named?", "What's my sister's dog called?", "What did my sister name her dog?",
          "Tell me the name of my sister's dog.")),
    Kind("town", _pick(CITIES), ("I grew up in {v}.", "My home town is {v}.", "I was raised in {v}, a city I still miss.", "{v}, that's where I spent my childhood.",
                                 "{v} is the city where I grew up."),
         ("Which city did I grow up in?", "What is my home town?", "Where was I raised?",
          "Remind me which city I come from.")),
    Kind("locker", _code4, ("My locker code is {v}.", "Please remember that my locker code is {v}.",
                            "The code for my locker is {v}.", "{v}, that's the number that opens my locker.", "I use {v} as my locker code."),
         ("What is my locker code?", "What's the code for my locker?", "Which code opens my locker?",
          "Tell me my locker code again.")),
    Kind("boss", _pick(PEOPLE), ("My manager's name is {v}.", "I work for a manager called {v}.",
                                 "My boss at work is {v}.", "{v}, that's who I report to at work.", "{v} is my manager at work."),
         ("What is my manager's name?", "Who is my boss at work?", "What's the name of my manager?",
          "Remind me who my manager is.")),
    Kind("birthday", _date, ("My birthday is on {v}.", "I was born on {v}.", "I celebrate my birthday on {v}.", "{v}, that's the day I was born.",
                             "{v} is my birthday."),
         ("When is my birthday?", "On what day was I born?", "What date is my birthday?",
          "Remind me of my birthday.")),
    Kind("color", _pick(COLORS), ("My favourite colour is {v}.", "I love the colour {v} more than any other.",
                                  "The colour I like best is {v}.", "{v}, that's the colour I would always choose.", "{v} is my favourite colour."),
         ("What is my favourite colour?", "Which colour do I like best?", "What colour did I say I love?",
          "Tell me my favourite colour.")),
    Kind("food", _pick(FOODS), ("My favourite food is {v}.", "I could eat {v} every day.", "The dish I love most is {v}.", "{v}, that's what I order whenever I can.",
                                "{v} is my favourite dish."),
         ("What is my favourite food?", "Which dish do I love most?", "What food could I eat every day?",
          "Remind me what my favourite dish is.")),
    Kind("instrument", _pick(INSTRUMENTS), ("I play the {v}.", "I have been learning the {v} for years.",
                                            "My instrument is the {v}.", "The {v}, that's what I practise every evening.", "The {v} is the instrument I play."),
         ("Which instrument do I play?", "What instrument have I been learning?", "What is my instrument?",
          "Tell me which instrument I play.")),
    Kind("passkey", _code5, ("The pass key is {v}. Remember it.", "My pass key is {v}.",
                             "Remember this pass key: {v}.", "{v}, that's the pass key I want you to keep.", "{v} is the pass key, keep it in mind."),
         ("What is the pass key?", "What's the pass key I gave you?", "Which pass key did I tell you?",
          "Remind me of the pass key.")),
    Kind("flat", _code4, ("I live in flat number {v}.", "My flat number is {v}.", "My apartment is number {v}.", "{v}, that's the number on my flat's door.",
                          "Number {v} is my flat."),
         ("What is my flat number?", "Which flat do I live in?", "What's my apartment number?",
          "Remind me of my flat number.")),
    Kind("friend", _pick(PEOPLE), ("My best friend is called {v}.", "My best friend's name is {v}.",
                                   "I have known my best friend {v} since school.", "{v}, that's the name of my best friend.", "{v} is my best friend."),
         ("What is my best friend called?", "Who is my best friend?", "What's my best friend's name?",
          "Tell me my best friend's name.")),
)

ACKS = ["Got it, I will remember that.", "Noted!", "Thanks for telling me.", "I'll keep that in mind.",
        "Okay, understood.", "That's lovely to know."]

# other talk: small-talk exchanges made from parts, so that thousands of distinct turns exist
TOPICS = ["winter", "summer", "gardening", "cooking", "running", "chess", "painting", "camping", "baking", "cycling",
          "reading", "photography", "swimming", "hiking", "knitting", "astronomy", "birdwatching", "pottery"]
ASKS = ["What is a good way to start {t}?", "Can you give me a tip about {t}?", "Why do people enjoy {t}?",
        "What equipment do I need for {t}?", "Is {t} hard to learn?", "How much time should I spend on {t}?"]
REPLIES = ["Start small with {t}: a few minutes a day is enough to build the habit, and you can grow from there.",
           "For {t}, the most useful thing is patience. Practise regularly and do not worry about mistakes.",
           "Many people enjoy {t} because it is relaxing and gives a sense of progress over time.",
           "You need very little to begin {t}. Borrow what you can before buying anything expensive.",
           "{T} is easy to start and takes years to master, which is part of its charm.",
           "Two or three sessions of {t} a week is a good rhythm for most beginners."]
TRIVIA = [("What is the capital of Australia?", "The capital of Australia is Canberra."),
          ("How far is the Moon?", "The Moon is about 384,400 kilometres from Earth on average."),
          ("Tell me a fun fact.", "Octopuses have three hearts and blue blood."),
          ("Why is the sky blue?", "Air scatters blue light more than red light, so the sky looks blue."),
          ("How many legs does a spider have?", "A spider has eight legs."),
          ("What is the boiling point of water?", "At sea level water boils at 100 degrees Celsius."),
          ("Who wrote Hamlet?", "Hamlet was written by William Shakespeare."),
          ("What is photosynthesis?", "Photosynthesis is how plants turn light, water and carbon dioxide into sugar."),
          ("How many continents are there?", "There are seven continents."),
          ("What is the largest ocean?", "The Pacific is the largest ocean on Earth.")]

# the held-out kind of talk: recipes and household instructions (never in training)
DISHES = ["a tomato soup", "pancakes", "a lentil stew", "a green salad", "banana bread", "fried rice", "a vegetable curry"]
HELD_OUT_ASKS = ["How do I make {d}?", "Can you give me a simple recipe for {d}?", "What do I need to cook {d}?"]
HELD_OUT_REPLIES = ["For {d}, gather your ingredients first, chop everything, then cook on a medium heat and taste "
                    "as you go. Season at the end.",
                    "To make {d}, prepare the vegetables, heat a pan with a little oil, add everything in order of "
                    "cooking time and stir now and then.",
                    "{D} is simple: measure the ingredients, mix them well, and give it the time it needs. Serve warm."]
HELD_OUT_TALK = "recipes"
TALK_KINDS = ("smalltalk", "trivia", "scripture", HELD_OUT_TALK)
# the evaluation's other talk: scripture passages (trained on, as haystack and in chats) derail SmolLM2-135M's answers
# even with the fact in its window (in-window recall 0/10 against 4-5/10 with trivia or small talk), so the
# evaluation's chats hold small talk and trivia, or the held-out recipes
EVAL_TALK = ("smalltalk", "trivia")

# repetitive filler (the pass-key task's kind of haystack): a few short sentences repeated. Training draws them
# from these pools; the pass-key evaluation's own filler (runtime/niah.py: grass, sky, sun, "Here we go.") is
# kept out of them, so that it stays a held-out haystack
FILLER_SUBJECTS = ["The river", "The road", "The tea", "The house", "The wall", "The cloud", "The moon", "The field",
                   "The door", "The tree", "The stone", "The snow", "The bread", "The lamp", "The hill", "The sea"]
FILLER_ADJECTIVES = ["wide", "long", "hot", "old", "white", "grey", "bright", "quiet", "open", "tall", "cold", "soft",
                     "dark", "round", "warm", "still"]
FILLER_PHRASES = ["Off we go.", "Up and down again.", "On and on it goes.", "Here it comes.", "Round and round.",
                  "Day after day.", "So it goes.", "One more time.", "Back and forth.", "Now and then."]


def filler_unit(rng) -> str:
    """2-6 short sentences, the unit a repetitive haystack repeats."""
    out = []
    for _ in range(int(rng.integers(2, 7))):
        if rng.random() < 0.7:
            s = FILLER_SUBJECTS[int(rng.integers(len(FILLER_SUBJECTS)))]
            out.append(f"{s} is {FILLER_ADJECTIVES[int(rng.integers(len(FILLER_ADJECTIVES)))]}.")
        else:
            out.append(FILLER_PHRASES[int(rng.integers(len(FILLER_PHRASES)))])
    return " ".join(out)


_GENESIS: list[str] | None = None


def genesis_verses() -> list[str]:
    global _GENESIS
    if _GENESIS is None:
        import cortex_edge

        p = Path(cortex_edge.__file__).parent / "model" / "data" / "genesis_kjv.txt"  # in the repo and in a wheel
        _GENESIS = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    return _GENESIS


def talk_turn(rng, kind: str) -> tuple[str, str]:
    """One exchange of other conversation (user, assistant)."""
    if kind == "smalltalk":
        t = TOPICS[int(rng.integers(len(TOPICS)))]
        r = REPLIES[int(rng.integers(len(REPLIES)))]
        return ASKS[int(rng.integers(len(ASKS)))].format(t=t), r.format(t=t, T=t.capitalize())
    if kind == "trivia":
        return TRIVIA[int(rng.integers(len(TRIVIA)))]
    if kind == "scripture":
        v = genesis_verses()
        i = int(rng.integers(len(v) - 6))
        passage = " ".join(v[i:i + int(rng.integers(2, 6))])
        return f"Here is a passage I am reading: {passage} What do you think of it?", \
            "It is a passage from the book of Genesis, told in the plain and solemn style of the King James Version."
    d = DISHES[int(rng.integers(len(DISHES)))]
    r = HELD_OUT_REPLIES[int(rng.integers(len(HELD_OUT_REPLIES)))]
    return HELD_OUT_ASKS[int(rng.integers(len(HELD_OUT_ASKS)))].format(d=d), r.format(d=d, D=d.capitalize())


@dataclass
class Fact:
    kind: str
    value: str
    statement: str
    question: str


def draw_fact(rng, kind: Kind, held_out: bool) -> Fact:
    v = kind.value(rng)
    st = kind.statements[-1] if held_out else kind.statements[int(rng.integers(len(kind.statements) - 1))]
    q = kind.questions[-1] if held_out else kind.questions[int(rng.integers(len(kind.questions) - 1))]
    return Fact(kind.name, v, st.format(v=v), q)


@dataclass
class Conversation:
    facts: list[Fact]
    messages: list[dict]  # fact turns, then other talk; the questions are asked after these
    talk: str


def conversation(seed: int, n_facts: int, talk_tokens: int, count, held_out: bool = False,
                 talk: str | tuple[str, ...] | None = None, kinds: tuple[Kind, ...] = KINDS) -> Conversation:
    """k facts (distinct kinds) in the first user turns, then other talk until about talk_tokens tokens
    (count(text) -> tokens) have passed. held_out: the held-out wordings; talk: a kind of other talk or a tuple of
    kinds (default: every training kind, as training draws them)."""
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(kinds))[:n_facts]
    facts = [draw_fact(rng, kinds[int(i)], held_out) for i in chosen]
    msgs: list[dict] = []
    # facts: one per turn, or two together in one message
    j = 0
    while j < len(facts):
        if j + 1 < len(facts) and rng.random() < 0.3:
            nxt = facts[j + 1].statement
            if not nxt.startswith(facts[j + 1].value):  # a value stated first keeps its capital
                nxt = nxt[0].lower() + nxt[1:]
            text = f"{facts[j].statement} Also, {nxt}"
            j += 2
        else:
            text = facts[j].statement
            j += 1
        msgs += [{"role": "user", "content": text}, {"role": "assistant", "content": ACKS[int(rng.integers(len(ACKS)))]}]
    kinds_of_talk = [talk] if isinstance(talk, str) else list(talk) if talk else \
        [k for k in TALK_KINDS if k != HELD_OUT_TALK]
    used = 0
    while used < talk_tokens:
        u, a = talk_turn(rng, kinds_of_talk[int(rng.integers(len(kinds_of_talk)))])
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        used += count(u) + count(a) + 10
    return Conversation(facts, msgs, talk if isinstance(talk, str) else "mixed")


def answer_contains(answer: str, value: str) -> bool:
    """The value as a whole in the answer (any case): not inside a longer word or number ("June 2" is not in
    "June 21st", "7595" not in "17595"; "June 2nd" and "Pixel's" count)."""
    return re.search(r"(?<!\w)" + re.escape(value.lower()) + r"(?!\d)(?!(?<=[a-z])[a-z])", answer.lower()) is not None
