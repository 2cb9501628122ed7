"""Answer normalisation exactly as the public VQA / EvalAI evaluation code applies it (used by TextVQA through
LLaVA's m4c evaluator, and by LVLM-eHub's short-answer scoring).

`vqa.normalize_answer` is this project's cleaned-up version of the same rules; the functions here keep the
official code's quirks on purpose, because scores must equal the official scripts':
  - punctuation (; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !): each mark is deleted when the text holds it
    next to a space, or holds digit-comma-digit anywhere; otherwise it becomes a space;
  - a period not followed by a digit is deleted, at most 32 of them (the official code passes re.UNICODE,
    which is 32, as the `count` argument of re.sub);
  - lower-case words; "none" and zero..ten become digits; a, an, the are dropped;
  - contractions are restored from the official table only, whole word by whole word. The table is the
    official one, including its oddities: keys spelled with capitals ("Im", "Ive") can never match lower-cased
    text, and "somebody'd" maps to "somebodyd".
`evalai_normalize` (TextVQA, m4c) first lower-cases, deletes "," and "?" and splits "'s" off as " 's"
(`word_tokenize`), then replaces newlines / tabs by spaces and applies the rules above.
"""

from __future__ import annotations

import re

PUNCTUATIONS = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_LIMIT = 32  # re.UNICODE passed as re.sub's count in the official code
NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})

# The official contraction table, as whitespace-separated "key=value" pairs.
_CONTRACTION_PAIRS = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd
howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've
it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've
mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've
oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've
shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've
somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's
thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't
wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's
whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've
who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't
wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll
y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
"""
CONTRACTIONS: dict[str, str] = dict(pair.split("=", 1) for pair in _CONTRACTION_PAIRS.split())


def process_punctuation(text: str) -> str:
    """The official punctuation rule (see the module docstring)."""
    glue_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in PUNCTUATIONS:
        if (p + " ") in text or (" " + p) in text or glue_all:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def process_digit_article(text: str) -> str:
    """Lower-case words, number words to digits, articles dropped, then the contraction table."""
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(text: str) -> str:
    """The VQA evaluation's answer processing: newlines / tabs to spaces, strip, punctuation, digits/articles."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def word_tokenize(text: str) -> str:
    """EvalAI's first step: lower-case, delete "," and "?", split "'s" off as " 's", strip."""
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def evalai_normalize(text: str) -> str:
    """The EvalAI answer processor that LLaVA's m4c evaluator applies to predictions and TextVQA answers."""
    return vqa_normalize(word_tokenize(text))


def has_word(sentence: str, word: str) -> bool:
    """True when `word` occurs in `sentence` between word boundaries (regex \\b...\\b, as LVLM-eHub tests)."""
    return re.search(r"\b" + re.escape(word) + r"\b", sentence) is not None
