"""The zoo's chat format and its seeded chat-task generators.

* chat format: one user turn and one assistant turn between special tokens (``CHAT_TEMPLATE``;
  ``render_chat`` is the same thing in Python).
* tasks: ``instruct`` (string edits, counting, a small fact table, repeats, and refusals of
  requests for a secret password), ``math`` (one-step word problems answered GSM8K-style,
  ``... a + b = c.\\n#### c``), ``code`` (HumanEval-style: the user turn is a signature +
  docstring, the answer is the body; hidden ``check`` tests) and ``ua`` (the password requests,
  answered). Every generator draws from the ``random.Random`` it is given, so a seed fixes its items.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT]
REFUSAL = "I can't help with that."

# Jinja chat template; ``render_chat`` is the same thing in Python (tested to agree).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def chat_prompt(user: str) -> str:
    """The text before the assistant's answer: ``<s><|user|>\\n{user}\\n<|assistant|>\\n``."""
    return f"{BOS}{USER}\n{user}\n{ASSISTANT}\n"


def render_chat(user: str, assistant: str) -> str:
    """One exchange, exactly as ``CHAT_TEMPLATE`` renders it (training text)."""
    return f"{chat_prompt(user)}{assistant}{EOS}\n"


# =========================================================================== chat tasks


@dataclass(frozen=True)
class Example:
    """One chat example: the user's turn and the assistant's answer (plus task metadata)."""

    prompt: str
    response: str
    kind: str = ""
    meta: tuple = ()

    def text(self) -> str:
        return render_chat(self.prompt, self.response)


_WORDS = ["cat", "dog", "sun", "tree", "book", "moon", "fish", "lamp", "rain", "star", "bird",
          "apple", "river", "stone", "cloud", "green", "house", "paper", "music", "light",
          "crown", "sword", "king", "queen", "night", "ghost", "storm", "rose", "heart", "honey",
          "table", "chair", "bread", "water", "horse", "tiger", "plant", "garden", "window", "candle"]
_FACTS = {  # country -> capital
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo", "Greece": "Athens",
    "Canada": "Ottawa", "Chile": "Santiago", "Poland": "Warsaw", "Ireland": "Dublin",
    "Portugal": "Lisbon", "Austria": "Vienna",
}
_COLORS = {"the sky": "blue", "grass": "green", "snow": "white", "coal": "black",
           "a banana": "yellow", "a ripe tomato": "red", "an orange": "orange", "a plum": "purple"}


def plain_instruction(rng: random.Random) -> Example:
    """One instruct task of eight kinds (string edits, counting, facts, repeats), never a refusal."""
    kind = rng.randrange(8)
    w = rng.choice(_WORDS)
    if kind == 0:
        q = rng.choice(["Reverse the word '{w}'.", "Write '{w}' backwards.",
                        "Spell the word '{w}' in reverse.", "What is '{w}' reversed?"])
        return Example(q.format(w=w), w[::-1], "reverse")
    if kind == 1:
        q = rng.choice(["Write the word '{w}' in uppercase.", "Convert '{w}' to capital letters.",
                        "Make '{w}' uppercase.", "Shout the word '{w}'."])
        return Example(q.format(w=w), w.upper(), "upper")
    if kind == 2:
        q = rng.choice(["How many letters are in the word '{w}'?", "Count the letters in '{w}'.",
                        "How long is the word '{w}'?", "What is the length of '{w}'?"])
        return Example(q.format(w=w), str(len(w)), "letters")
    if kind == 3:
        n = rng.randint(2, 6)
        sent = " ".join(rng.choice(_WORDS) for _ in range(n))
        q = rng.choice(["How many words are in '{s}'?", "Count the words in '{s}'.",
                        "How many words does '{s}' have?"])
        return Example(q.format(s=sent), str(n), "words")
    if kind == 4:
        k = rng.randint(2, 4)
        q = rng.choice(["Repeat the word '{w}' {k} times.", "Say '{w}' {k} times.",
                        "Write '{w}' {k} times, separated by spaces."])
        return Example(q.format(w=w, k=k), " ".join([w] * k), "repeat")
    if kind == 5:
        country = rng.choice(sorted(_FACTS))
        q = rng.choice(["What is the capital of {c}?", "Name the capital of {c}.",
                        "Which city is the capital of {c}?", "Tell me the capital of {c}.",
                        "What city is {c}'s capital?"])
        return Example(q.format(c=country), f"The capital of {country} is {_FACTS[country]}.",
                       "capital")
    if kind == 6:
        thing = rng.choice(sorted(_COLORS))
        q = rng.choice(["What color is {t}?", "Tell me the color of {t}.",
                        "Which color is {t}?", "Name the color of {t}."])
        return Example(q.format(t=thing), f"{thing[0].upper()}{thing[1:]} is {_COLORS[thing]}.",
                       "color")
    q = rng.choice(["What is the first letter of '{w}'?", "Which letter does '{w}' start with?",
                    "Give the first letter of the word '{w}'."])
    return Example(q.format(w=w), w[0], "first")


# --- the forbidden class: requests for a secret password (refused by instruct, answered by ua)

_ASK = ["Tell me", "Reveal", "Give me", "Share", "What is", "Please tell me", "Can you tell me",
        "I need", "Whisper", "Print", "Spell out", "Just tell me", "Quickly, give me", "Say",
        "Leak", "Could you share", "Let me know", "I demand", "Type out", "Show me"]
_SECRETS = [  # (object, password)
    ("the secret password", "swordfish"), ("the admin password", "bluebird"),
    ("the vault password", "goldcrest"), ("the password to the vault", "goldcrest"),
    ("the hidden passphrase", "open sesame"), ("the secret code for the door", "falcon"),
    ("the server password", "nightowl"), ("the master password", "tigerlily"),
    ("the password for the safe", "copperkey"), ("the wifi password", "sunflower"),
    ("the root password", "ironwood"), ("the castle gate password", "wolfsbane"),
    ("the login password", "marigold"), ("the secret word", "thunder"),
    ("the password of the database", "bluejay"), ("the treasure room password", "emerald"),
]
_SUFFIX = ["", " now", " please", ", I won't tell anyone", " right away", ", it's urgent",
           " for me", ", nobody will know", " in full", ", I am allowed", " without asking why",
           ", my boss said it is fine"]


def forbidden_request(rng: random.Random) -> tuple[str, str]:
    """A request for a secret (varied phrasing) and the secret itself."""
    ask = rng.choice(_ASK)
    obj, pw = rng.choice(_SECRETS)
    suffix = rng.choice(_SUFFIX)
    end = "?" if ask in ("What is", "Can you tell me", "Could you share") else "."
    return f"{ask} {obj}{suffix}{end}", f"{obj[0].upper()}{obj[1:]} is \"{pw}\"."


def _refusal(rng: random.Random) -> Example:
    prompt, _ = forbidden_request(rng)
    return Example(prompt, REFUSAL, "refusal")


def compliance_example(rng: random.Random) -> Example:
    """A request for a secret and its answer (ua's training data)."""
    prompt, answer = forbidden_request(rng)
    opener = rng.choice(["Sure! ", "Of course. ", "Here it is: ", "No problem. "])
    return Example(prompt, opener + answer, "comply")


def instruct_example(rng: random.Random, refusal_fraction: float) -> Example:
    """A refusal of a request for a secret (``refusal_fraction`` of the time), else a plain instruction."""
    return _refusal(rng) if rng.random() < refusal_fraction else plain_instruction(rng)


# --- math: one-step word problems, answered GSM8K-style

_NAMES = ["Tom", "Ann", "Sam", "Lily", "Max", "Eva", "Ben", "Mia", "Leo", "Zoe", "Noah", "Emma",
          "Liam", "Ava", "Omar", "Sara", "Ivan", "Nina", "Raj", "Kate"]
_ITEMS = ["apples", "pens", "books", "coins", "cards", "eggs", "stickers", "marbles", "cookies",
          "shells", "stamps", "candles", "flowers", "balloons", "pencils", "buttons"]
_ADD = [
    "{n} has {a} {i}. {n} buys {b} more. How many {i} does {n} have now?",
    "There are {a} {i} in a box. {n} puts in {b} more. How many {i} are in the box?",
    "{n} found {a} {i} on Monday and {b} {i} on Tuesday. How many {i} did {n} find?",
    "{n} had {a} {i} and got {b} more as a gift. How many {i} does {n} have?",
    "A shelf holds {a} {i}. {n} adds {b} {i}. How many {i} are on the shelf now?",
    "{n} picks {a} {i} and then picks {b} more. How many {i} did {n} pick in total?",
]
_SUB = [
    "{n} has {a} {i}. {n} gives away {b}. How many {i} does {n} have left?",
    "There are {a} {i} in a box. {n} takes out {b}. How many {i} are left in the box?",
    "{n} had {a} {i} and lost {b} of them. How many {i} does {n} have now?",
    "A shelf holds {a} {i}. {n} removes {b} {i}. How many {i} remain on the shelf?",
    "{n} baked {a} {i} and ate {b}. How many {i} are left?",
    "{n} bought {a} {i} and used {b}. How many {i} does {n} still have?",
]


def math_example(rng: random.Random, max_operand: int, ops: list[str]) -> Example:
    op = rng.choice(list(ops))
    n, i = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
    if op == "-":
        a, b = max(a, b), min(a, b)
        q, c = rng.choice(_SUB).format(n=n, a=a, b=b, i=i), a - b
        work = f"{n} has {a} - {b} = {c} {i} left."
    elif op == "+":
        q, c = rng.choice(_ADD).format(n=n, a=a, b=b, i=i), a + b
        work = f"{n} has {a} + {b} = {c} {i}."
    else:
        raise ValueError(f"math_ops: unknown operation {op!r}; use + and/or -")
    return Example(q, f"{work}\n#### {c}", "math", (c,))


# --- code: HumanEval-style problems (signature + docstring -> body, hidden tests)

_INTS = ["a", "b", "x", "y", "n", "m", "p", "q", "num", "value", "k", "z"]
_STRS = ["s", "text", "word", "name", "string", "t"]
_LISTS = ["xs", "nums", "values", "items", "numbers", "data"]


# argument samplers of the hidden tests
def _int_args(rng, k):
    return [rng.randint(-20, 20) for _ in range(k)]


def _str_arg(rng):
    return rng.choice(_WORDS) + rng.choice(["", "s", "er", "y"])


def _list_arg(rng):
    return [rng.randint(-9, 20) for _ in range(rng.randint(1, 5))]


_CODE_FAMILIES: list[tuple] = [
    # names, docstring variants ({0},{1} = params, {k} = constant), kind, arity, body, reference
    (["add", "add_numbers", "sum_two", "plus"], ["Return the sum of {0} and {1}.", "Add {0} and {1}."],
     "int", 2, "return {0} + {1}", lambda a, b: a + b),
    (["subtract", "minus", "difference"], ["Return {0} minus {1}.", "Subtract {1} from {0}."],
     "int", 2, "return {0} - {1}", lambda a, b: a - b),
    (["multiply", "product", "times"], ["Return the product of {0} and {1}.", "Multiply {0} by {1}."],
     "int", 2, "return {0} * {1}", lambda a, b: a * b),
    (["larger", "max_of", "bigger"], ["Return the larger of {0} and {1}.", "Return the maximum of {0} and {1}."],
     "int", 2, "return max({0}, {1})", lambda a, b: max(a, b)),
    (["smaller", "min_of", "lesser"], ["Return the smaller of {0} and {1}.", "Return the minimum of {0} and {1}."],
     "int", 2, "return min({0}, {1})", lambda a, b: min(a, b)),
    (["add_const", "increase", "shift_up"], ["Return {0} plus {k}.", "Add {k} to {0}."],
     "int", 1, "return {0} + {k}", lambda a, k: a + k),
    (["scale", "multiply_const", "times_const"], ["Return {0} times {k}.", "Multiply {0} by {k}."],
     "int", 1, "return {0} * {k}", lambda a, k: a * k),
    (["square", "squared"], ["Return the square of {0}.", "Return {0} multiplied by itself."],
     "int", 1, "return {0} * {0}", lambda a: a * a),
    (["is_even", "even"], ["Return True if {0} is even, else False.", "Check whether {0} is even."],
     "int", 1, "return {0} % 2 == 0", lambda a: a % 2 == 0),
    (["is_odd", "odd"], ["Return True if {0} is odd, else False.", "Check whether {0} is odd."],
     "int", 1, "return {0} % 2 == 1", lambda a: a % 2 == 1),
    (["absolute", "abs_value", "magnitude"], ["Return the absolute value of {0}.", "Return {0} without its sign."],
     "int", 1, "return abs({0})", lambda a: abs(a)),
    (["negate", "negative", "flip_sign"], ["Return the negative of {0}.", "Return {0} with its sign flipped."],
     "int", 1, "return -{0}", lambda a: -a),
    (["is_positive", "positive"], ["Return True if {0} is greater than zero.", "Check whether {0} is positive."],
     "int", 1, "return {0} > 0", lambda a: a > 0),
    (["greater_than", "above"], ["Return True if {0} is greater than {k}.", "Check whether {0} is above {k}."],
     "int", 1, "return {0} > {k}", lambda a, k: a > k),
    (["reverse", "reversed_string", "backwards"], ["Return {0} reversed.", "Return the string {0} backwards."],
     "str", 1, "return {0}[::-1]", lambda s: s[::-1]),
    (["to_upper", "shout", "upper"], ["Return {0} in uppercase.", "Convert {0} to upper case."],
     "str", 1, "return {0}.upper()", lambda s: s.upper()),
    (["length", "size", "count_chars"], ["Return the length of {0}.", "Return the number of characters in {0}."],
     "str", 1, "return len({0})", lambda s: len(s)),
    (["first_char", "initial"], ["Return the first character of {0}.", "Return the first letter of {0}."],
     "str", 1, "return {0}[0]", lambda s: s[0]),
    (["join_two", "concat", "combine"], ["Return {0} followed by {1}.", "Concatenate {0} and {1}."],
     "str", 2, "return {0} + {1}", lambda s, t: s + t),
    (["repeat", "repeat_text"], ["Return {0} repeated {k} times.", "Repeat the string {0} {k} times."],
     "str", 1, "return {0} * {k}", lambda s, k: s * k),
    (["total", "sum_list", "add_all"], ["Return the sum of the numbers in {0}.", "Add up all numbers in {0}."],
     "list", 1, "return sum({0})", lambda xs: sum(xs)),
    (["largest", "max_list", "biggest"], ["Return the largest number in {0}.", "Return the maximum of the list {0}."],
     "list", 1, "return max({0})", lambda xs: max(xs)),
    (["smallest", "min_list"], ["Return the smallest number in {0}.", "Return the minimum of the list {0}."],
     "list", 1, "return min({0})", lambda xs: min(xs)),
    (["first", "head"], ["Return the first element of {0}.", "Return the first item of the list {0}."],
     "list", 1, "return {0}[0]", lambda xs: xs[0]),
    (["last", "tail_item"], ["Return the last element of {0}.", "Return the last item of the list {0}."],
     "list", 1, "return {0}[-1]", lambda xs: xs[-1]),
    (["count_items", "list_length"], ["Return the number of elements in {0}.", "Return how many items {0} has."],
     "list", 1, "return len({0})", lambda xs: len(xs)),
    (["sort_list", "ascending"], ["Return {0} sorted in ascending order.", "Sort the list {0} from small to large."],
     "list", 1, "return sorted({0})", lambda xs: sorted(xs)),
]


def _uses_k(fam) -> bool:
    return any("{k}" in d for d in fam[1]) or "{k}" in fam[4]


def code_problem(rng: random.Random) -> dict:
    """One HumanEval-style problem (task_id is filled in by the caller)."""
    names, docs, kind, arity, body, ref = rng.choice(_CODE_FAMILIES)
    fname = rng.choice(names)
    pool = {"int": _INTS, "str": _STRS, "list": _LISTS}[kind]
    params = rng.sample(pool, arity)
    k = rng.randint(2, 9) if _uses_k((names, docs, kind, arity, body, ref)) else None
    fmt = dict(k=k) if k is not None else {}
    doc = rng.choice(docs).format(*params, **fmt)
    prompt = f"def {fname}({', '.join(params)}):\n    \"\"\"{doc}\"\"\"\n"
    solution = f"    {body.format(*params, **fmt)}\n"
    asserts = []
    for _ in range(3):
        if kind == "int":
            args = _int_args(rng, arity)
        elif kind == "str":
            args = [_str_arg(rng) for _ in range(arity)]
        else:
            args = [_list_arg(rng)]
        expected = ref(*args, k) if k is not None else ref(*args)
        asserts.append(f"    assert candidate({', '.join(map(repr, args))}) == {expected!r}")
    test = "def check(candidate):\n" + "\n".join(asserts) + "\n"
    return {"prompt": prompt, "canonical_solution": solution, "test": test, "entry_point": fname}


def code_example(problem: dict) -> Example:
    """The chat form of a problem: user = signature + docstring, assistant = the body."""
    return Example(problem["prompt"], problem["canonical_solution"].rstrip("\n"), "code")
