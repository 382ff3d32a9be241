"""The tiny models' tokenizer, built in code: Qwen's pre-tokenizer and byte-level alphabet (in
GPT-2's fixed byte order, never `ByteLevel.alphabet()`, whose order changes per process), BPE
merges trained deterministically on a built-in corpus of prompt and policy words, then the
family's special tokens. ` true`, ` false` and `":` are single tokens, so verdict probes work."""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict

# Qwen's special tokens in Qwen's id order (151643.. in the real vocabulary).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
VOCAB_SIZE = 4096  # BPE vocabulary + special tokens; merges stop early when the corpus runs out

_CORPUS = """
the of and to a in is it that for on as with by this be are or not was at from an have has
but all any can will may should must would could do does did if then than so such no yes each
every one two three four five six seven eight nine ten first second third last next only also
other more most less some many much very just into over under about after before during while
between through without within against among you your we our they their them he she his her
its who what which when where why how there here these those been being were had made make
video videos frame frames image images clip scene scenes content person people man woman child
children minor minors adult adults user users animal animals students student school campus
model guardrail safety safe unsafe policy policies category categories rule rules harmful harm
description explanation analyse analyze analysis summarize summarise summary task tasks output
answer question following given provide provided return returns set true false json object key
keys value values core line lines start starting specific specifically relevant most flagged flag
violate violates violated violation violations violating detect detected detection evidence
sexual nudity explicit pornography material arouse arousal implication services promotion
promoting promote exploitation exploit unwanted protect protection especially breastfeeding art
dancing gymnastics performance performances sports swimwear kissing harassment bullying abuse
abusive intimidation privacy private information consent cyberbullying cruelty toward respectful
environment free threats threat violence violent fighting fight shooting shoot vandalism assault
injury damage glorification glorify self suicide dangerous acts act incite incitement graphic
blood weapon weapons gun guns knife firearms false deceptive misinformation claims claim denying
tragedies unfounded medical facts outdated altered generated presented real impersonation
deception trustworthy platform illegal regulated activities activity legal compliance trade
drugs drug gambling alcohol tobacco arson explosion explosions robbery burglary shoplifting
stealing war military terrorist actions action hateful hate hatred extremism extremist
discrimination disturbing torture gore mutilation anti social behaviour behavior depression
mental intent blocked allowed permitted prohibited disallowed begin end harassing bully
threatening accident accidents road traffic news documentary educational cartoon cartoons game
games fantasy suitable ages age older younger kids family friendly brand advertising whitelist
custom any none nothing something anything everything show shows showing shown depict depicts
depicting depiction contains contain containing include includes including involve involves
involving appear appears appearing visible clearly likely possible possibly potentially whether
look looks looking see seen watch watching observe observed describe describes described explain
explains explained reason reasons because therefore however although based considering judge
judgment determine decision decide score scores probability calibrated threshold severity high
medium low level levels name names id list listed below above format formatted exactly strictly
sentence sentences short brief concise detailed words word text role assistant system instruction
instructions please carefully read review reviewing moderation moderator moderate help helpful
hello world time times seconds second minute minutes long length number numbers count total
new old good bad right wrong left small large big little great same different general public
group groups individual individuals body bodies face faces hand hands room house street car
cars building outdoor indoor night day light dark water fire smoke crowd police officer
camera screen phone text audio music sound voice speech talk talking walking running standing
sitting holding wearing using playing eating drinking smoking driving throwing hitting kicking
punching pushing grabbing touching
DESCRIPTION GUARDRAIL EXPLANATION BLOCKED ALLOWED PROHIBITED PERMITTED DISALLOWED BEGIN END
HARMFUL CATEGORIES EXPLANATIONS Core Value Sexual Content Harassment Bullying Threats Violence
Harm False Deceptive Information Illegal Regulated Activities Hateful Extremism The This You
Your If It In For Each Set Only Return Answer Video Frame Policy Category No None Yes
C1 C2 C3 C4 C5 C6 C7 C8 C9 <box> </box> (Sexual Content)": true, false, {} [] : ; , . ! ? - _ /
0 1 2 3 4 5 6 7 8 9 10 0.0 0.5 1.0 seconds> <1.0 seconds>
"""
_ANSWER = 'GUARDRAIL: {"C1(Sexual Content)": true, "C2(Harassment & Bullying)": false}\n'
_ANSWER_REPEATS = 64


def build_tokenizer(special_tokens: tuple[str, ...] = SPECIAL_TOKENS, **names):
    """The tiny models' `Qwen2Tokenizer`: Qwen's pre-tokenizer, merges trained on `_CORPUS`,
    then `special_tokens`. `names` override the eos / pad tokens."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    # Every corpus word with and without a leading space, as inside and at the start of a line.
    corpus = _CORPUS.split()
    text = " ".join(corpus) + "\n" + "\n".join(corpus) + "\n" + _ANSWER * _ANSWER_REPEATS
    words = Counter(piece for piece, _ in pre.pre_tokenize_str(text))
    alphabet = _bytes_to_unicode()
    merges = _train_bpe(words, VOCAB_SIZE - len(alphabet) - len(special_tokens))
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    for token in [a + b for a, b in merges] + list(special_tokens):
        vocab.setdefault(token, len(vocab))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token=names.get("eos_token", "<|im_end|>"),
        pad_token=names.get("pad_token", "<|endoftext|>"),
        additional_special_tokens=list(special_tokens),
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    for piece in ('":', " true", " false"):
        assert len(tokenizer.encode(piece)) == 1, f"tiny tokenizer splits {piece!r}"
    return tokenizer


def _bytes_to_unicode() -> list[str]:
    """GPT-2's 256 byte symbols in GPT-2's fixed order (token ids 0..255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def _train_bpe(words: Counter[str], max_merges: int) -> list[tuple[str, str]]:
    """Plain BPE: merge the most frequent adjacent pair, ties broken by the pair's text."""
    seqs = [list(word) for word in words]
    freqs = list(words.values())
    counts: Counter[tuple[str, str]] = Counter()
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)

    heap: list[tuple[int, tuple[str, str]]] = []  # (-count, pair); stale entries skipped

    def account(i: int, sign: int) -> None:
        seq = seqs[i]
        for pair in zip(seq, seq[1:], strict=False):
            counts[pair] += sign * freqs[i]
            if sign > 0:
                where[pair].add(i)
            heapq.heappush(heap, (-counts[pair], pair))

    for i in range(len(seqs)):
        account(i, +1)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < max_merges:
        neg, pair = heapq.heappop(heap)
        if counts[pair] <= 0 or -neg != counts[pair]:
            continue  # stale heap entry
        merges.append(pair)
        for i in sorted(where.pop(pair)):
            account(i, -1)
            seqs[i] = _merge(seqs[i], pair)
            account(i, +1)
        del counts[pair]
    return merges


def _merge(seq: list[str], pair: tuple[str, str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(seq[i] + seq[i + 1])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out
