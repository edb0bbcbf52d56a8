"""Generated tasks for the embedded default model: short reformatting and transformation jobs, tool calls and
tool answers in the Gemma 4 chat format, each exactly checkable.

One family per function: `family(rng, phrasing)` returns a `Task` (chat messages, optional tools, the answer).
`phrasing` picks the instruction's wording: families have several; the last one is never trained on
(`HELD_OUT_PHRASING`), so a benchmark can ask in words the model has not seen. Everything is a pure function
of a seeded `random.Random`: the training stream and the held-out examples come from different seeds, and
`held_out_tasks` drops any example whose prompt occurs in the training stream. `values` picks where names,
cities, items, keys and numbers come from: the fixed pools (`POOLED`, what the recorded runs trained on) or made
up (`OPEN`), so that a model that only recalls its training pools shows as such.

    tasks = make_tasks(1000, seed=3)                 # mixed families, training phrasings
    held = held_out_tasks("case", 200)               # one family, unseen seed
    novel = held_out_tasks("kv_to_json", 30, values=OPEN)  # made-up names and numbers
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from decimal import Decimal

# ------------------------------------------------------------------------------------------------- word pools
NAMES = ("Ann", "Bob", "Maria", "Omar", "Li", "Sara", "Tom", "Eva", "Ravi", "Nina", "Paul", "Yuki", "Ines", "Karl",
         "Lena", "Amir", "Zoe", "Ivan", "Mia", "Leo", "Emma", "Noah", "Aisha", "Hugo", "Chen", "Rosa", "Sam", "Ida",
         "Jon", "Kate", "Marco", "Olga", "Pablo", "Grace", "Felix", "Hana", "Ali", "June", "Max", "Lucy")
CITIES = ("Oslo", "Paris", "Lisbon", "Tokyo", "Cairo", "Lima", "Rome", "Berlin", "Madrid", "Dublin", "Vienna",
          "Prague", "Seoul", "Delhi", "Austin", "Boston", "Denver", "Quito", "Nairobi", "Athens", "Warsaw", "Milan",
          "Zurich", "Sydney", "Toronto", "Havana", "Bogota", "Dakar", "Manila", "Hanoi", "Riga", "Porto", "Kyoto",
          "Lyon", "Bergen", "Munich", "Geneva", "Chicago", "Miami", "Perth")
ITEMS = ("apple", "pear", "fig", "plum", "kiwi", "lime", "mango", "grape", "lemon", "peach", "melon", "cherry",
         "banana", "orange", "olive", "date", "guava", "papaya", "apricot", "berry", "lamp", "chair", "table", "desk",
         "pen", "book", "cup", "plate", "sofa", "clock", "phone", "camera", "bottle", "bag", "shoe", "hat", "coat",
         "bike", "kite", "drum")
WORDS = ("user", "account", "id", "name", "first", "last", "order", "total", "price", "item", "count", "max",
         "min", "page", "size", "file", "path", "data", "list", "index", "value", "key", "type", "time", "date",
         "start", "end", "is", "valid", "get", "set", "load", "save", "http", "request", "response", "error", "code",
         "text", "line", "number", "email", "address", "city", "zip", "phone", "status", "active", "created", "at",
         "updated", "by", "parent", "child", "node", "tree", "cache", "hit", "rate", "retry", "limit", "queue",
         "token", "batch", "model", "layer", "input", "output", "buffer", "stream", "event", "handler", "config",
         "default", "new", "old", "temp", "user", "group", "role", "level")
ROLES = ("admin", "editor", "viewer", "guest", "owner", "staff")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")


# ------------------------------------------------------------------------------------------------ value sources
# Syllables for made-up words: names, cities, items and keys a model cannot have memorized, so that a task drawn
# with OPEN values can only be answered by copying from the prompt.
SYLLABLES = tuple(c + v for c in "bdfghjklmnprstvz" for v in "aeiou") + (
    "an", "el", "in", "or", "us", "ar", "en", "ol", "ith", "ston", "berg", "ton", "ley", "mar", "dor", "wen")


def made_up_word(rng: random.Random, low: int = 1, high: int = 3) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(low, high)))


def _distinct(draw: Callable[[], str], k: int) -> list[str]:
    """`k` different results of `draw`, in the order first drawn."""
    out: list[str] = []
    while len(out) < k:
        x = draw()
        if x not in out:
            out.append(x)
    return out


# Real words outside every pool above (`REAL` values): what a user types, like "name=Ada, city=London". No
# training stream draws them; `benchmarks/default_model.py --values real` measures copying them.
REAL_NAMES = ("Ada", "Alan", "Linus", "Agnes", "Boris", "Clara", "Diego", "Edith", "Farah", "Gustav", "Helga",
              "Igor", "Jasmine", "Kofi", "Lars", "Maya", "Nikolai", "Oscar", "Priya", "Quentin", "Rahul", "Sofia",
              "Tariq", "Ursula", "Viktor", "Wendy", "Xavier", "Yasmin", "Zara", "Bruno", "Carmen", "Dmitri",
              "Elena", "Fatima", "George", "Harriet", "Isaac", "Jorge", "Kenji", "Leila")
REAL_CITIES = ("London", "Kampala", "Helsinki", "Santiago", "Glasgow", "Stockholm", "Budapest", "Bangkok", "Jakarta",
               "Montreal", "Melbourne", "Istanbul", "Marseille", "Valencia", "Krakow", "Tallinn", "Reykjavik",
               "Casablanca", "Lagos", "Mumbai", "Karachi", "Osaka", "Shanghai", "Auckland", "Vancouver", "Phoenix",
               "Seattle", "Detroit", "Houston", "Atlanta", "Naples", "Florence", "Sevilla", "Granada", "Antwerp",
               "Rotterdam", "Hamburg", "Dresden", "Salzburg", "Ljubljana")
REAL_WORDS = ("walnut", "carrot", "pepper", "onion", "potato", "tomato", "cabbage", "spinach", "almond", "cashew",
              "pencil", "marker", "stapler", "folder", "ladder", "hammer", "wrench", "blanket", "pillow", "mirror",
              "candle", "basket", "bucket", "helmet", "jacket", "scarf", "glove", "sandal", "violin", "guitar",
              "piano", "trumpet", "rocket", "tractor", "wagon", "canoe", "anchor", "compass", "lantern", "kettle",
              "width", "height", "weight", "street", "country", "region", "author", "title", "harbor", "balance",
              "amount", "currency", "quota", "tenant", "session", "cursor", "offset", "vendor", "ticket", "invoice")


def real_word(rng: random.Random, low: int = 1, high: int = 1) -> str:
    """A `make_word` for REAL values: one real word, whatever the asked-for number of syllables."""
    return rng.choice(REAL_WORDS)


@dataclass(frozen=True)
class Values:
    """Where a task's names, cities, items, words, keys and numbers come from. POOLED: the fixed pools above (the
    draws every recorded run trained on, call for call); OPEN: made-up words (`make_word`: joined syllables by
    default) and wide number ranges; where `names` or `cities` are given, OPEN names or cities are drawn from
    them instead of made up (REAL)."""

    open: bool = False
    make_word: Callable[[random.Random, int, int], str] = made_up_word
    names: tuple[str, ...] = ()
    cities: tuple[str, ...] = ()

    def name(self, rng: random.Random) -> str:
        if not self.open:
            return rng.choice(NAMES)
        return rng.choice(self.names) if self.names else self.make_word(rng, 1, 3).capitalize()

    def city(self, rng: random.Random) -> str:
        if not self.open:
            return rng.choice(CITIES)
        return rng.choice(self.cities) if self.cities else self.make_word(rng, 2, 3).capitalize()

    def item(self, rng: random.Random) -> str:
        return self.make_word(rng, 1, 3) if self.open else rng.choice(ITEMS)

    def items(self, rng: random.Random, k: int) -> list[str]:
        return _distinct(lambda: self.make_word(rng, 1, 3), k) if self.open else rng.sample(ITEMS, k)

    def word(self, rng: random.Random) -> str:
        """A word of an identifier (case conversion)."""
        return self.make_word(rng, 1, 2) if self.open and rng.random() < 0.5 else rng.choice(WORDS)

    def keys(self, rng: random.Random, k: int) -> list[str]:
        """`k` distinct keys of a record: the ten known ones, or (open) known, identifier words and made-up."""
        if not self.open:
            return rng.sample(KEYS, k)

        def key() -> str:
            kind = rng.random()
            return rng.choice(KEYS) if kind < 0.4 else rng.choice(WORDS) if kind < 0.7 else self.make_word(rng, 1, 2)
        return _distinct(key, k)

    def number(self, rng: random.Random, low: int, high: int, open_low: int, open_high: int) -> int:
        return rng.randint(open_low, open_high) if self.open else rng.randint(low, high)

    def value(self, rng: random.Random, key: str):
        """A record's value for `key`: typed by the key when it is a known one, else a string, integer or bool."""
        if key not in KEYS:
            kind = rng.random()
            return (self.make_word(rng, 1, 3) if kind < 0.5 else rng.randint(0, 9999) if kind < 0.85
                    else rng.random() < 0.5)
        return {"name": lambda: self.name(rng), "city": lambda: self.city(rng),
                "age": lambda: self.number(rng, 18, 90, 0, 120), "id": lambda: self.number(rng, 1, 999, 1, 99_999),
                "active": lambda: rng.random() < 0.5,
                "role": lambda: self.make_word(rng, 2, 3) if self.open else rng.choice(ROLES),
                "item": lambda: self.item(rng), "qty": lambda: self.number(rng, 1, 20, 2, 999),
                "score": lambda: self.number(rng, 0, 100, 0, 1000),
                "year": lambda: self.number(rng, 1990, 2030, 1000, 2999)}[key]()


POOLED = Values()
OPEN = Values(open=True)
REAL = Values(open=True, make_word=real_word, names=REAL_NAMES, cities=REAL_CITIES)


@dataclass
class Task:
    family: str
    messages: list[dict]  # the conversation up to (not including) the answer
    answer: str  # the assistant's text, or the tool call's rendered text for tool_call
    tools: list[dict] | None = None
    kind: str = "text"  # "text": answer + <turn|>; "tool_call": <|tool_call>...<tool_call|><|tool_response>
    call: dict | None = field(default=None)  # tool_call: {"name": ..., "arguments": {...}}
    thought: str | None = None  # written in the thought channel before the answer (`worked_arithmetic`)

    @property
    def prompt_key(self) -> str:
        return json.dumps([self.messages, self.tools], sort_keys=True)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _phrase(rng: random.Random, templates: tuple[str, ...], phrasing: str) -> str:
    """A training wording (all but the last), or the held-out one (the last)."""
    return templates[-1] if phrasing == "held_out" else rng.choice(templates[:-1])


# ---------------------------------------------------------------------------------------------- JSON families


KEYS = ("name", "city", "age", "id", "active", "role", "item", "qty", "score", "year")


def _scalar_text(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def kv_to_json(rng: random.Random, phrasing: str = "train", values: Values = POOLED) -> Task:
    keys = values.keys(rng, rng.randint(2, 4))
    obj = {k: values.value(rng, k) for k in keys}
    sep = rng.choice((", ", "; ", " ", "\n"))
    pairs = sep.join(f"{k}={_scalar_text(v)}" for k, v in obj.items())
    text = _phrase(rng, ("Convert to JSON: {p}", "Turn these key=value pairs into a JSON object:\n{p}",
                         "key=value to JSON: {p}", "Write {p} as a JSON object."), phrasing).format(p=pairs)
    return Task("kv_to_json", _user(text), json.dumps(obj))


def csv_to_json(rng: random.Random, phrasing: str = "train", values: Values = POOLED) -> Task:
    n_cols = rng.randint(2, 3)
    keys = values.keys(rng, n_cols)
    rows = [{k: values.value(rng, k) for k in keys} for _ in range(rng.randint(1, 2) if n_cols == 2 else 1)]
    csv = "\n".join([",".join(keys)] + [",".join(_scalar_text(r[k]) for k in keys) for r in rows])
    text = _phrase(rng, ("Convert this CSV to JSON:\n{c}", "CSV to JSON:\n{c}", "Turn the CSV into a JSON list:\n{c}",
                         "Here is a CSV table:\n{c}\nGive it as JSON."), phrasing).format(c=csv)
    return Task("csv_to_json", _user(text), json.dumps(rows))


def json_to_yaml(rng: random.Random, phrasing: str = "train", values: Values = POOLED) -> Task:
    keys = values.keys(rng, rng.randint(2, 3))
    obj = {k: values.value(rng, k) for k in keys}
    if rng.random() < 0.3:
        obj["tags"] = values.items(rng, 2)
    lines = []
    for k, v in obj.items():
        if isinstance(v, list):
            lines += [f"{k}:"] + [f"  - {x}" for x in v]
        else:
            lines.append(f"{k}: {_scalar_text(v)}")
    text = _phrase(rng, ("Convert to YAML: {j}", "JSON to YAML:\n{j}", "Rewrite this JSON as YAML: {j}",
                         "Give me the YAML for {j}"), phrasing).format(j=json.dumps(obj))
    return Task("json_to_yaml", _user(text), "\n".join(lines))


# ------------------------------------------------------------------------------------------------ text families
CASES = {
    "snake_case": lambda w: "_".join(w),
    "camelCase": lambda w: w[0] + "".join(x.capitalize() for x in w[1:]),
    "kebab-case": lambda w: "-".join(w),
    "PascalCase": lambda w: "".join(x.capitalize() for x in w),
    "Title Case": lambda w: " ".join(x.capitalize() for x in w),
    "SCREAMING_SNAKE_CASE": lambda w: "_".join(w).upper(),
}


def case_conversion(rng: random.Random, phrasing: str = "train", values: Values = POOLED) -> Task:
    words = [values.word(rng) for _ in range(rng.randint(2, 3))]
    source, target = rng.sample(list(CASES), 2)
    text = _phrase(rng, ("Convert {s} to {t}.", "{s} in {t}:", "Rename {s} to {t}", "What is {s} written in {t}?"),
                   phrasing).format(s=CASES[source](words), t=target)
    return Task("case", _user(text), CASES[target](words))


def sort_dedup(rng: random.Random, phrasing: str = "train", values: Values = POOLED) -> Task:
    if rng.random() < 0.6:
        pool = values.items(rng, rng.randint(3, 5))
        key = str
    else:
        pool = [str(x) for x in rng.sample(range(1, 1000 if values.open else 100), rng.randint(3, 5))]
        key = int
    items = pool + [rng.choice(pool) for _ in range(rng.randint(1, 2))]
    rng.shuffle(items)
    reverse = rng.random() < 0.25
    answer = ", ".join(sorted(set(items), key=key, reverse=reverse))
    order = "descending" if reverse else "ascending"
    text = _phrase(rng, ("Sort in {o} order and remove duplicates: {l}", "Deduplicate and sort ({o}): {l}",
                         "Unique values of {l}, sorted {o}", "Remove repeats from {l} and sort them, {o}."),
                   phrasing).format(o=order, l=", ".join(items))
    return Task("sort_dedup", _user(text), answer)


DATE_FORMATS = {
    "YYYY-MM-DD": lambda d: d.isoformat(),
    "DD/MM/YYYY": lambda d: f"{d.day:02d}/{d.month:02d}/{d.year}",
    "MM/DD/YYYY": lambda d: f"{d.month:02d}/{d.day:02d}/{d.year}",
    "Month D, YYYY": lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    "D Month YYYY": lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
}


def date_format(rng: random.Random, phrasing: str = "train", values: Values = POOLED) -> Task:
    d = (date(1700, 1, 1) + timedelta(days=rng.randrange(365 * 400)) if values.open
         else date(1990, 1, 1) + timedelta(days=rng.randrange(365 * 45)))
    # the source is never an ambiguous numeric form: ISO or a month name
    source = rng.choice(("YYYY-MM-DD", "Month D, YYYY", "D Month YYYY"))
    target = rng.choice([f for f in DATE_FORMATS if f != source])
    text = _phrase(rng, ("Write {d} as {f}.", "Format the date {d} as {f}", "Date {d} -> {f}",
                         "Reformat {d} in the {f} format."), phrasing).format(d=DATE_FORMATS[source](d), f=target)
    return Task("date", _user(text), DATE_FORMATS[target](d))


UNITS = (("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("l", "ml", 1000), ("m", "mm", 1000),
         ("cm", "mm", 10), ("MB", "KB", 1000), ("GB", "MB", 1000))


def _number(x: Decimal) -> str:
    s = format(x.normalize(), "f")
    return s


def unit_conversion(rng: random.Random, phrasing: str = "train", values: Values = POOLED) -> Task:
    big, small, factor = rng.choice(UNITS)
    amount = Decimal(rng.randint(1, 999)) / Decimal(rng.choice((1, 10, 100)))
    if rng.random() < 0.5:
        src, dst, value, result = big, small, amount, amount * factor
    else:
        src, dst, value, result = small, big, amount, amount / factor
    text = _phrase(rng, ("Convert {v} {s} to {d}.", "{v} {s} in {d}?", "How many {d} is {v} {s}?",
                         "Express {v} {s} in {d}."), phrasing).format(v=_number(value), s=src, d=dst)
    return Task("units", _user(text), f"{_number(result)} {dst}")


TIMES_FACTORS = ((2, 12), (2, 9))  # a product's first and second factor, inclusive: the 88 facts of the times table
TIMES_TABLE = tuple((a, b) for a in range(TIMES_FACTORS[0][0], TIMES_FACTORS[0][1] + 1)
                    for b in range(TIMES_FACTORS[1][0], TIMES_FACTORS[1][1] + 1))


def arithmetic(rng: random.Random, phrasing: str = "train", values: Values = POOLED) -> Task:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(*TIMES_FACTORS[0]), rng.randint(*TIMES_FACTORS[1])
    else:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        if op == "-" and b > a:
            a, b = b, a
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    text = _phrase(rng, ("What is {a} {o} {b}?", "Compute {a} {o} {b}.", "{a} {o} {b} =", "Calculate {a} {o} {b}"),
                   phrasing).format(a=a, o=op, b=b)
    return Task("arithmetic", _user(text), str(result))


def column_steps(a: int, b: int, op: str) -> str:
    """School column arithmetic, least significant digit first: '8+7=15 3+5+1=9' for 38 + 57 (each step's
    carry goes into the next), '12-5=7 5-1-4=0' for 52 - 45 (a borrow shows as 10 added and 1 taken next).
    Multiplication (a times table here) has no steps: ''."""
    if op == "*":
        return ""
    steps, carry = [], 0
    for i in range(max(len(str(a)), len(str(b)))):
        x, y = a // 10**i % 10, b // 10**i % 10
        if op == "+":
            total = x + y + carry
            steps.append(f"{x}+{y}{f'+{carry}' if carry else ''}={total}")
            carry = total // 10
        else:
            top = x - carry
            borrow = int(top < y)
            steps.append(f"{x + 10 * borrow}{f'-{carry}' if carry else ''}-{y}={top + 10 * borrow - y}")
            carry = borrow
    return " ".join(steps)


def column_thought(task: Task) -> str | None:
    """An `arithmetic` task's `column_steps` (None for a product, which has none)."""
    return column_steps(*arithmetic_operands(task)) or None


def worked_arithmetic(rng: random.Random, phrasing: str = "train", values: Values = POOLED) -> Task:
    """`arithmetic` with its column steps in the thought channel (the arithmetic probe, BENCHMARKS.md): the same
    prompts and answers, so the same judge; only what the model writes before the answer differs."""
    task = arithmetic(rng, phrasing, values)
    return replace(task, thought=column_thought(task))


def aligned_steps(a: int, b: int, op: str) -> str:
    """Both operands and the result zero-padded to three digits, most significant first: '038+057=095' for
    38 + 57, '052-045=007', '012*009=108'. Digits are one token each, so every result digit sits at a fixed
    distance from the operand digits of its column and from the column below it (the carry): a computation at
    fixed offsets within the canvas, where `column_steps` makes the model find each column's digits in the
    prompt and read its own steps back in reverse order."""
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"{a:03d}{op}{b:03d}={result:03d}"


def aligned_thought(task: Task) -> str:
    """An `arithmetic` task's `aligned_steps`."""
    return aligned_steps(*arithmetic_operands(task))


def aligned_arithmetic(rng: random.Random, phrasing: str = "train", values: Values = POOLED) -> Task:
    """`arithmetic` with `aligned_steps` in the thought channel (the aligned arithmetic probe): the same prompts,
    answers and judge as the family."""
    task = arithmetic(rng, phrasing, values)
    return replace(task, thought=aligned_thought(task))


def padded_unique(task: Task) -> str | None:
    """A list of numbers' values without repeats, in the order they first appear, as fixed-width units zero-padded
    to the longest ('47, 5, 23, 47' -> '47 05 23'); None for a list of words. The thought of the padded sorting
    probe: the deduplication and a copy in prompt order first, each number a fixed number of digit tokens, so
    that the answer only has to order units of equal width. (A sort_dedup prompt holds no digits but its list's.)"""
    if not task.answer[0].isdigit():
        return None
    items = list(dict.fromkeys(re.findall(r"\d+", task.messages[0]["content"])))
    width = max(map(len, items))
    return " ".join(x.zfill(width) for x in items)


def padded_sort_dedup(rng: random.Random, phrasing: str = "train", values: Values = POOLED) -> Task:
    """`sort_dedup` whose lists of numbers first write `padded_unique` in the thought channel (the padded sorting
    probe); lists of words answer directly."""
    task = sort_dedup(rng, phrasing, values)
    return replace(task, thought=padded_unique(task))


# What a worked formulation writes in the thought channel for a task of its family, by name
# (benchmarks/default_model.py scores the one a model's thoughts match).
THOUGHTS: dict[str, tuple[str, Callable[[Task], str | None]]] = {
    "column": ("arithmetic", column_thought), "aligned": ("arithmetic", aligned_thought),
    "padded": ("sort_dedup", padded_unique)}


def times_table(rng: random.Random, phrasing: str = "train", values: Values = POOLED) -> Task:
    """An `arithmetic` task that is a product (one of TIMES_TABLE): the times-table probe's draw, the
    arithmetic stream with its sums and differences skipped."""
    while True:
        task = arithmetic(rng, phrasing, values)
        if arithmetic_operands(task)[2] == "*":
            return task


def arithmetic_operands(task: Task) -> tuple[int, int, str]:
    """(a, b, op) of an `arithmetic` task: every wording ends with `a op b` and at most one of '?.='."""
    a, op, b = task.messages[0]["content"].rstrip("?.=").split()[-3:]
    return int(a), int(b), op


EXTRACT_SENTENCES = (
    ("{name} is {age} years old and lives in {city}.", ("name", "age", "city")),
    ("{name}, {age}, moved to {city} last year.", ("name", "age", "city")),
    ("Order {id}: {qty} x {item}, shipped to {city}.", ("id", "qty", "item", "city")),
    ("{name} bought {qty} {item} in {city}.", ("name", "qty", "item", "city")),
    ("In {year}, {name} scored {score} points in {city}.", ("year", "name", "score", "city")),
    ("{name} ({role}) joined in {year}.", ("name", "role", "year")),
)


def extract_fields(rng: random.Random, phrasing: str = "train", values: Values = POOLED) -> Task:
    sentence, keys = rng.choice(EXTRACT_SENTENCES)
    fields = {k: values.value(rng, k) for k in keys}
    if "qty" in fields and fields["qty"] == 1:
        fields["qty"] = 2
    wanted = [k for k in keys if rng.random() < 0.75] or [keys[0]]
    text = _phrase(rng, ("Extract {f} as JSON: {s}", "{s}\nGive {f} as a JSON object.", "From \"{s}\" get {f} in JSON.",
                         "Pull out {f} from this sentence as JSON: {s}"),
                   phrasing).format(f=", ".join(wanted), s=sentence.format(**fields))
    return Task("extract", _user(text), json.dumps({k: fields[k] for k in wanted}))


# ---------------------------------------------------------------------------------------------- tool families
def _tool(name: str, description: str, params: dict[str, tuple[str, str]], required: list[str]) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "required": required,
                       "properties": {p: {"type": t, "description": d} for p, (t, d) in params.items()}}}}


TOOLS = {
    "get_weather": _tool("get_weather", "Current weather in a city", {"city": ("string", "City name")}, ["city"]),
    "convert_currency": _tool("convert_currency", "Convert money", {
        "amount": ("number", "Amount"), "from": ("string", "ISO code"), "to": ("string", "ISO code")},
        ["amount", "from", "to"]),
    "set_timer": _tool("set_timer", "Start a timer", {"minutes": ("integer", "Length")}, ["minutes"]),
    "send_email": _tool("send_email", "Send an email", {"to": ("string", "Recipient"),
                                                        "subject": ("string", "Subject")}, ["to", "subject"]),
    "search": _tool("search", "Search the web", {"query": ("string", "Query")}, ["query"]),
    "get_time": _tool("get_time", "Current time in a city", {"city": ("string", "City name")}, ["city"]),
}
CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CHF", "NOK", "INR", "BRL")
TOPICS = ("cheap flights", "pasta recipes", "python tutorials", "hiking trails", "jazz concerts", "used bikes",
          "museum hours", "train tickets", "yoga classes", "coffee shops")
SUBJECTS = ("Lunch", "Meeting", "Invoice", "Trip", "Report", "Party", "Hello", "Update")


def _request(rng: random.Random, phrasing: str, values: Values) -> tuple[str, dict, str]:
    """(tool name, arguments, the user's request)."""
    name = rng.choice(list(TOOLS))
    if name == "get_weather":
        args = {"city": values.city(rng)}
        t = ("What's the weather in {city}?", "Is it raining in {city}?", "Weather for {city} please.",
             "How warm is it in {city} right now?")
    elif name == "get_time":
        args = {"city": values.city(rng)}
        t = ("What time is it in {city}?", "Current time in {city}?", "Tell me the time in {city}.",
             "Do you know the local time in {city}?")
    elif name == "convert_currency":
        src, dst = rng.sample(CURRENCIES, 2)
        args = {"amount": rng.randint(1, 500), "from": src, "to": dst}
        t = ("Convert {amount} {from} to {to}.", "How much is {amount} {from} in {to}?", "{amount} {from} in {to}?",
             "What do {amount} {from} make in {to}?")
    elif name == "set_timer":
        args = {"minutes": rng.randint(1, 90)}
        t = ("Set a timer for {minutes} minutes.", "Timer: {minutes} minutes.", "Start a {minutes} minute timer.",
             "Remind me in {minutes} minutes.")
    elif name == "send_email":
        args = {"to": values.name(rng).lower() + "@example.com", "subject": rng.choice(SUBJECTS)}
        t = ("Email {to} with the subject {subject}.", "Send {to} an email titled {subject}.",
             "Write to {to}, subject: {subject}.", "Mail {to} about \"{subject}\".")
    else:
        args = {"query": rng.choice(TOPICS) + " in " + values.city(rng)}
        t = ("Search for {query}.", "Look up {query}.", "Find {query} online.", "Can you google {query}?")
    return name, args, _phrase(rng, t, phrasing).format(**args)


def _declared(rng: random.Random, name: str) -> list[dict]:
    others = rng.sample([n for n in TOOLS if n != name], rng.randint(0, 1))
    names = [name] + others
    rng.shuffle(names)
    return [TOOLS[n] for n in names]


def _call_text(value) -> str:
    """A tool call's arguments as the Gemma 4 template writes them (keys sorted, strings in <|"|>)."""
    if isinstance(value, str):
        return '<|"|>' + value + '<|"|>'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_call_text(value[k])}" for k in sorted(value)) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_call_text(v) for v in value) + "]"
    return str(value)


def tool_call(rng: random.Random, phrasing: str = "train", values: Values = POOLED) -> Task:
    name, args, request = _request(rng, phrasing, values)
    answer = f"<|tool_call>call:{name}{_call_text(args)}<tool_call|><|tool_response>"
    return Task("tool_call", _user(request), answer, tools=_declared(rng, name), kind="tool_call",
                call={"name": name, "arguments": args})


CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy")


def _response(rng: random.Random, name: str, args: dict, values: Values) -> tuple[dict, tuple[str, ...]]:
    """(the tool's response, answer templates using args and the response)."""
    if name == "get_weather":
        return ({"condition": rng.choice(CONDITIONS), "temperature": rng.randint(-10, 35)},
                ("It is {condition} and {temperature} degrees in {city}.",))
    if name == "get_time":
        return {"time": f"{rng.randint(0, 23):02d}:{rng.choice(range(0, 60, 5)):02d}"}, ("It is {time} in {city}.",)
    if name == "convert_currency":
        return {"result": round(args["amount"] * rng.uniform(0.5, 2.0), 2)}, ("{amount} {from} is {result} {to}.",)
    if name == "set_timer":
        return {"status": "started"}, ("Your {minutes} minute timer is running.",)
    if name == "send_email":
        return {"status": "sent"}, ("The email to {to} was sent.",)
    return {"top": values.name(rng) + "'s guide to " + args["query"]}, ("The top result is {top}.",)


def tool_answer(rng: random.Random, phrasing: str = "train", values: Values = POOLED) -> Task:
    """After a tool call and its response, the model's answer in words (the second half of an agent turn)."""
    name, args, request = _request(rng, phrasing, values)
    response, templates = _response(rng, name, args, values)
    messages = _user(request) + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": name, "arguments": args}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps(response)}]
    return Task("tool_answer", messages, templates[0].format(**args, **response), tools=_declared(rng, name))


FAMILIES: dict[str, Callable[[random.Random, str, Values], Task]] = {
    "kv_to_json": kv_to_json, "csv_to_json": csv_to_json, "json_to_yaml": json_to_yaml, "case": case_conversion,
    "sort_dedup": sort_dedup, "date": date_format, "units": unit_conversion, "arithmetic": arithmetic,
    "extract": extract_fields, "tool_call": tool_call, "tool_answer": tool_answer,
}
TRAIN_SEED = 10_000  # training stream: TRAIN_SEED + recipe seed
HELD_OUT_SEED = 424_242  # held-out examples (benchmarks/default_model.py, tests)
VALIDATION_SEED = 535_353  # examples for choosing sampler settings, so the held-out ones stay untouched


def make_tasks(n: int, seed: int, phrasing: str = "train", families: tuple[str, ...] = tuple(FAMILIES),
               weights: dict[str, float] | None = None, values: Values = POOLED) -> list[Task]:
    """`n` tasks from one seeded stream: each a seeded choice of family, uniform over `families`, or drawn in
    proportion to `weights` (family -> weight; families it leaves out are never drawn); names, numbers and
    the like from `values`."""
    rng = random.Random(seed)
    if weights is None:
        return [FAMILIES[rng.choice(families)](rng, phrasing, values) for _ in range(n)]
    unknown = sorted(set(weights) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown task families {unknown}")
    names, w = list(weights), list(weights.values())
    return [FAMILIES[rng.choices(names, w)[0]](rng, phrasing, values) for _ in range(n)]


def held_out_tasks(family: str, n: int, phrasing: str = "train",
                   exclude: set[str] | frozenset[str] | None = None, seed: int = HELD_OUT_SEED,
                   values: Values = POOLED) -> list[Task]:
    """`n` tasks of one family from the held-out seed (or VALIDATION_SEED), none of whose prompts is in
    `exclude` (the training prompts), nor repeated. OPEN values draw from their own stream of the seed."""
    rng = random.Random(seed + sorted(FAMILIES).index(family) + (1000 if phrasing == "held_out" else 0)
                        + (2000 if values.open else 0))
    out, seen = [], set(exclude or ())
    while len(out) < n:
        task = FAMILIES[family](rng, phrasing, values)
        if task.prompt_key not in seen:
            seen.add(task.prompt_key)
            out.append(task)
    return out
