"""Generate the small byte-level dataset that ships inside the package (trainer/embedded/).

There is no network where autofit is developed and tested, yet a demo run must show a loss that
clearly falls. So the text is made here, from a fixed seed: short stories, facts about an invented
world, question-and-answer pairs and arithmetic word problems, written from templates and word
lists. The world's facts (each animal's colour, each town's river) are drawn once and then repeated
consistently, so a model gains by remembering across documents, not only by learning spelling;
stories reuse their hero's name and pronoun, which rewards looking back along the context.

    python scripts/make_embedded_data.py            # rewrites trainer/embedded/
    python scripts/make_embedded_data.py --check    # regenerates in memory, compares with the files

The output is deterministic: the same seed gives byte-identical files (gzip with mtime 0).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import random
import sys
from collections import Counter
from pathlib import Path

SEED = 1337
TRAIN_BYTES = 1_500_000
VAL_BYTES = 100_000
OUT_DIR = Path(__file__).resolve().parent.parent / "trainer" / "embedded"

NAMES = {  # name -> pronoun; fixed so a story's pronoun always matches its hero
    "Anna": "she", "Ben": "he", "Clara": "she", "Dan": "he", "Eva": "she", "Finn": "he",
    "Grace": "she", "Hugo": "he", "Ida": "she", "Jack": "he", "Kate": "she", "Leo": "he",
    "Mia": "she", "Noah": "he", "Olga": "she", "Paul": "he", "Rosa": "she", "Sam": "he",
    "Tara": "she", "Tom": "he", "Uma": "she", "Victor": "he", "Wendy": "she", "Max": "he",
    "Lily": "she", "Oscar": "he", "Nora": "she", "Felix": "he", "Ruby": "she", "Theo": "he",
}
POSSESSIVE = {"she": "her", "he": "his"}
OBJECT = {"she": "her", "he": "him"}

ANIMALS = ["cat", "dog", "fox", "owl", "goat", "horse", "rabbit", "duck", "frog", "bear",
           "mouse", "crow", "sheep", "pig", "hen", "deer", "wolf", "bee", "fish", "swan"]
COLOURS = ["red", "brown", "black", "white", "grey", "green", "yellow", "blue", "orange", "gold"]
FOODS = ["apples", "bread", "seeds", "carrots", "grass", "berries", "corn", "nuts", "honey",
         "fish", "cheese", "leaves", "plums", "beans", "rice"]
SOUNDS = ["purrs", "barks", "yelps", "hoots", "bleats", "neighs", "squeaks", "quacks",
          "croaks", "growls", "sings", "hums", "hisses", "whistles", "clicks"]
TOWNS = ["Ashford", "Bramley", "Cobham", "Dunmore", "Elmsworth", "Fairhill", "Glenrock",
         "Harwick", "Ivydale", "Kestrel", "Larkfield", "Millbrook", "Northwood", "Oakham",
         "Pinecrest", "Redcliff", "Stonebridge", "Thornby", "Westmere", "Yarrow"]
RIVERS = ["Ash", "Brook", "Dee", "Esk", "Fal", "Kent", "Lune", "Nene", "Ouse", "Tees", "Wye"]
GOODS = ["bread", "cheese", "wool", "boats", "clocks", "hats", "shoes", "pots", "rope",
         "candles", "paper", "glass", "honey", "cloth", "tools"]

ADJECTIVES = ["small", "big", "old", "young", "happy", "sad", "brave", "shy", "kind", "clever",
              "quiet", "loud", "tired", "busy", "lazy", "curious", "gentle", "proud", "funny", "wise"]
PLACES = ["the forest", "the garden", "the market", "the river", "the hill", "the school",
          "the farm", "the beach", "the park", "the village", "the old mill", "the library",
          "the lake", "the field", "the kitchen", "the bridge"]
THINGS = ["a red ball", "a small box", "an old map", "a blue kite", "a shiny key", "a wooden boat",
          "a big hat", "a green apple", "a lost shoe", "a little bell", "a yellow flower",
          "a warm coat", "a round stone", "a paper bird", "a silver coin", "a long rope"]
COUNTABLE = ["apples", "eggs", "books", "stones", "cakes", "pens", "shells", "coins", "cups",
             "flowers", "boxes", "fish", "plums", "bells", "carrots", "ducks"]
ACTIVITIES = ["read a book", "sing a song", "bake bread", "draw pictures", "play with a ball",
              "walk by the river", "feed the ducks", "plant seeds", "fly a kite", "climb trees",
              "count the stars", "write letters", "fix old clocks", "pick berries", "swim in the lake"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TIMES = ["morning", "evening", "afternoon", "night", "day"]
WEATHER = ["it was sunny", "it was raining", "the wind was cold", "it was very hot",
           "snow was falling", "the sky was grey", "the air was warm"]
FEELINGS = ["happy", "glad", "surprised", "worried", "excited", "calm", "proud", "sleepy"]
EXCLAIM = ["Look at this!", "What a day!", "Oh no!", "How strange!", "I knew it!",
           "This is wonderful!", "Can you help me?", "Let us go home."]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve"]


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


def article(word: str) -> str:
    """'a dog', 'an owl': the article must agree, or the model learns bad English."""
    return ("an " if word[0] in "aeiou" else "a ") + word


class World:
    """The fixed facts every document draws on; drawn once from the seed, then never changed."""

    def __init__(self, rng: random.Random):
        self.colour = {a: rng.choice(COLOURS) for a in ANIMALS}
        self.food = {a: rng.choice(FOODS) for a in ANIMALS}
        self.sound = {a: rng.choice(SOUNDS) for a in ANIMALS}
        self.river = {t: rng.choice(RIVERS) for t in TOWNS}
        self.goods = {t: rng.choice(GOODS) for t in TOWNS}
        self.people = {t: rng.randrange(2, 60) * 100 for t in TOWNS}
        self.home = {n: rng.choice(TOWNS) for n in NAMES}
        self.pet = {n: rng.choice(ANIMALS) for n in NAMES}


def story(rng: random.Random, w: World) -> str:
    hero = rng.choice(list(NAMES))
    he = NAMES[hero]
    his = POSSESSIVE[he]
    friend = rng.choice([n for n in NAMES if n != hero])
    pet = w.pet[hero]
    place = rng.choice(PLACES)
    thing = rng.choice(THINGS)
    adj = rng.choice(ADJECTIVES)
    s = [rng.choice([
        f"Once upon a time, there was {article(adj)} child named {hero} who lived in {w.home[hero]}.",
        f"{hero} was {article(adj)} child from {w.home[hero]}.",
        f"In the town of {w.home[hero]}, there lived {article(adj)} child called {hero}.",
    ])]
    s.append(f"{cap(he)} had {article(w.colour[pet])} {pet} that loved to eat {w.food[pet]}.")
    s.append(f"Every {rng.choice(TIMES)}, {hero} liked to {rng.choice(ACTIVITIES)}.")
    s.append(f"One {rng.choice(DAYS)}, {rng.choice(WEATHER)}, and {hero} went to {place} with {his} {pet}.")
    s.append(rng.choice([
        f"There, {he} found {thing}.",
        f"Near {place}, {hero} saw {thing} under a tree.",
        f"At {place}, the {pet} found {thing} and brought it to {hero}.",
    ]))
    s.append(f"\"{rng.choice(EXCLAIM)}\" said {hero}.")
    if rng.random() < 0.6:
        s.append(rng.choice([
            f"{hero} showed it to {friend}, and {friend} smiled.",
            f"Then {friend} came by and asked, \"What is that, {hero}?\"",
            f"{friend} helped {OBJECT[he]} carry it home.",
        ]))
    if rng.random() < 0.5:
        n = rng.randrange(2, 10)
        s.append(f"On the way home, {he} counted {NUMBER_WORDS[n]} {rng.choice(COUNTABLE)}.")
    s.append(rng.choice([
        f"That night, {hero} felt {rng.choice(FEELINGS)} and went to sleep.",
        f"In the end, {hero} and {his} {pet} were very {rng.choice(FEELINGS)}.",
        f"And the {w.colour[pet]} {pet} {w.sound[pet]} softly by the fire.",
    ]))
    return " ".join(s)


def town_facts(rng: random.Random, w: World) -> str:
    town = rng.choice(TOWNS)
    s = [f"{town} is a town on the river {w.river[town]}."]
    facts = [
        f"About {w.people[town]} people live in {town}.",
        f"The people of {town} make {w.goods[town]}.",
        f"Every {rng.choice(DAYS)}, there is a market in {town} where you can buy {w.goods[town]}.",
        f"The river {w.river[town]} is {rng.choice(['wide', 'slow', 'cold', 'deep', 'clear'])} near {town}.",
    ]
    rng.shuffle(facts)
    s += facts[: rng.randrange(2, 5)]
    locals_ = [n for n in NAMES if w.home[n] == town]
    if locals_:
        s.append(f"{rng.choice(locals_)} lives in {town}.")
    return " ".join(s)


def animal_qa(rng: random.Random, w: World) -> str:
    lines = []
    for _ in range(rng.randrange(2, 5)):
        a = rng.choice(ANIMALS)
        q = rng.randrange(4)
        if q == 0:
            lines.append(f"Q: What colour is the {a}?\nA: The {a} is {w.colour[a]}.")
        elif q == 1:
            lines.append(f"Q: What does the {a} eat?\nA: The {a} eats {w.food[a]}.")
        elif q == 2:
            lines.append(f"Q: What sound does the {a} make?\nA: The {a} {w.sound[a]}.")
        else:
            n = rng.choice(list(NAMES))
            lines.append(f"Q: What pet does {n} have?\nA: {n} has {article(w.colour[w.pet[n]])} {w.pet[n]}.")
    return "\n".join(lines)


def arithmetic(rng: random.Random, w: World) -> str:
    n = rng.choice(list(NAMES))
    he = NAMES[n]
    item = rng.choice(COUNTABLE)
    a, b = rng.randrange(2, 20), rng.randrange(1, 20)
    kind = rng.randrange(3)
    if kind == 0:
        return (f"{n} had {a} {item}. Then {he} got {b} more. "
                f"Now {n} has {a} + {b} = {a + b} {item}.")
    if kind == 1:
        b = rng.randrange(1, a)
        return (f"{n} had {a} {item} and gave {b} away. "
                f"Now {n} has {a} - {b} = {a - b} {item}.")
    a, b = rng.randrange(2, 10), rng.randrange(2, 10)
    return (f"{n} has {a} bags with {b} {item} in each bag. "
            f"So {n} has {a} x {b} = {a * b} {item} in all.")


def letter(rng: random.Random, w: World) -> str:
    sender, to = rng.sample(list(NAMES), 2)
    town = w.home[sender]
    return (f"Dear {to},\nI hope you are well. Here in {town} {rng.choice(WEATHER)} all week. "
            f"My {w.pet[sender]} ate all the {w.food[w.pet[sender]]} again! "
            f"Tomorrow I will {rng.choice(ACTIVITIES)}. Please come to {town} soon; "
            f"we can go to {rng.choice(PLACES)} together.\nYour friend,\n{sender}")


KINDS = [(story, 4), (town_facts, 2), (animal_qa, 2), (arithmetic, 2), (letter, 1)]


def generate(n_bytes: int, rng: random.Random, w: World) -> bytes:
    makers = [k for k, weight in KINDS for _ in range(weight)]
    docs, size = [], 0
    while size < n_bytes:
        doc = rng.choice(makers)(rng, w) + "\n\n"
        docs.append(doc)
        size += len(doc)
    return "".join(docs).encode("ascii")[:n_bytes]


def entropies(data: bytes) -> tuple[float, float, float]:
    """Unigram, bigram-conditional and trigram-conditional entropy in bits per byte."""
    def h(counts: Counter) -> float:
        total = sum(counts.values())
        return -sum(c / total * math.log2(c / total) for c in counts.values())
    uni = h(Counter(data))
    bi = h(Counter(zip(data, data[1:])))
    tri = h(Counter(zip(data, data[1:], data[2:])))
    return uni, bi - uni, tri - bi


def build() -> dict[str, bytes]:
    rng = random.Random(SEED)
    world = World(rng)
    # Separate streams so changing one split's size leaves the other's text unchanged.
    train = generate(TRAIN_BYTES, random.Random(f"{SEED}-train"), world)
    val = generate(VAL_BYTES, random.Random(f"{SEED}-val"), world)
    uni, bi, tri = entropies(train)
    meta = {
        "name": "embedded",
        "description": "English-like text from a fixed-seed template grammar, byte tokens",
        "generator": "scripts/make_embedded_data.py",
        "seed": SEED,
        "vocab_size": 256,
        "dtype": "uint8",
        "splits": {
            "train": {"file": "train.bin.gz", "tokens": len(train), "sha256": hashlib.sha256(train).hexdigest()},
            "val": {"file": "val.bin.gz", "tokens": len(val), "sha256": hashlib.sha256(val).hexdigest()},
        },
        "bits_per_byte": {"unigram": round(uni, 3), "bigram_conditional": round(bi, 3),
                          "trigram_conditional": round(tri, 3)},
    }
    return {
        "train.bin.gz": gzip.compress(train, compresslevel=9, mtime=0),
        "val.bin.gz": gzip.compress(val, compresslevel=9, mtime=0),
        "meta.json": (json.dumps(meta, indent=2) + "\n").encode(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--check", action="store_true", help="compare with the files on disk; write nothing")
    args = parser.parse_args()
    files = build()
    if args.check:
        stale = [n for n, b in files.items() if not (args.out / n).is_file() or (args.out / n).read_bytes() != b]
        print("up to date" if not stale else f"out of date: {', '.join(stale)}")
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (args.out / name).write_bytes(blob)
        print(f"wrote {args.out / name} ({len(blob):,} bytes)")
    print(json.loads(files["meta.json"])["bits_per_byte"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
