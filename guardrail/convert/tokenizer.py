"""InternLM2's sentencepiece tokenizer as a `tokenizers` fast tokenizer, and the original
`internlm2-chat` prompt format.

The original checkpoint ships only `tokenizer.model` (sentencepiece BPE with byte fallback) plus
remote tokenizer code. We rebuild it from the model proto, following the proto's own normalizer
settings, rename the placeholder pieces that `tokenizer_config.json`'s `added_tokens_decoder`
renames (`[UNUSED_TOKEN_145]` -> `<|im_end|>` ...), and add the tokens InternVL appended after the
sentencepiece vocabulary (`<img>`, `</img>`, `<IMG_CONTEXT>`, ..., `</box>`) with their original
ids. `SpmReference` is the original tokenizer's behaviour in a few lines (split on added tokens,
sentencepiece on the rest, BOS first); the tests hold the fast tokenizer to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from guardrail.errors import ModelError

# NOTE: sentencepiece piece types (sentencepiece_model.proto): 1 normal, 2 unknown, 3 control,
# 4 user defined, 5 unused, 6 byte.
_NORMAL, _USER_DEFINED = 1, 4
_BPE = 2  # TrainerSpec.ModelType


@dataclass(frozen=True)
class AddedToken:
    id: int
    content: str
    special: bool = True


def added_tokens(tokenizer_config: dict) -> list[AddedToken]:
    """`added_tokens_decoder` of a tokenizer_config.json, in id order."""
    decoder = tokenizer_config.get("added_tokens_decoder") or {}
    return sorted((AddedToken(int(i), t["content"], bool(t.get("special", True)))
                   for i, t in decoder.items()), key=lambda t: t.id)


def load_proto(model_file: Path):
    """The sentencepiece ModelProto of `tokenizer.model` (needs `protobuf`)."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as err:  # protobuf missing
        raise ModelError(f"reading {model_file.name} needs the `protobuf` package "
                         f"({err})") from None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as err:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise ModelError(f"{model_file}: not a sentencepiece model ({err})") from None
    if proto.trainer_spec.model_type != _BPE or not proto.pieces:
        raise ModelError(f"{model_file}: expected a sentencepiece BPE model "
                         "(InternLM2's tokenizer)")
    return proto


def build_tokenizer(proto, added: list[AddedToken], add_bos: bool = True):
    """A `tokenizers.Tokenizer` that encodes like InternLM2's tokenizer."""
    from tokenizers import AddedToken as HFAddedToken
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    size = len(proto.pieces)
    pieces = [p.piece for p in proto.pieces]
    for tok in added:
        if tok.id < size:
            pieces[tok.id] = tok.content
    vocab = {piece: i for i, piece in enumerate(pieces)}
    if len(vocab) != size:
        raise ModelError("tokenizer.model: duplicate pieces after applying added_tokens_decoder")
    # SentencePiece BPE merges the adjacent pair whose concatenation scores highest: rank every
    # split of every normal piece by that piece's score (ties by id).
    normal = {pieces[i]: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
    ranked = sorted((-score, i, tok[:k], tok[k:]) for tok, (score, i) in normal.items()
                    for k in range(1, len(tok)) if tok[:k] in normal and tok[k:] in normal)
    merges = [(left, right) for _, _, left, right in ranked]
    user_defined = [pieces[i] for i, p in enumerate(proto.pieces) if p.type == _USER_DEFINED]
    spec = proto.normalizer_spec
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=proto.trainer_spec.unk_piece,
                        fuse_unk=True, byte_fallback=proto.trainer_spec.byte_fallback,
                        ignore_merges=bool(user_defined)))
    # Normalizer in sentencepiece's order: charsmap, extra spaces, dummy prefix, escape spaces.
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    if user_defined:  # sentencepiece emits user-defined pieces whole
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    dec = [decoders.Replace("▁", " ")]
    if proto.trainer_spec.byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if spec.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(dec)
    # Added tokens keep their original ids: those past the vocabulary must follow it in order.
    for t in added:
        next_id = tok.get_vocab_size(with_added_tokens=True)
        if t.id >= size and t.id != next_id:
            raise ModelError(f"added token {t.content!r} has id {t.id}; expected {next_id} "
                             "(ids after the vocabulary must be contiguous)")
        tok.add_special_tokens([HFAddedToken(t.content, special=t.special, normalized=False)])
        got = tok.token_to_id(t.content)
        if got != t.id:
            raise ModelError(f"added token {t.content!r} got id {got}, expected {t.id}")
    bos = proto.trainer_spec.bos_piece
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, proto.trainer_spec.bos_id)])
    return tok


class SpmReference:
    """What InternLM2's own tokenizer does: split on the added tokens, sentencepiece-encode the
    text between them, BOS first."""

    def __init__(self, model_file: Path, added: list[AddedToken]):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.ids = {t.content: t.id for t in added}
        alternatives = sorted(self.ids, key=len, reverse=True)
        self.pattern = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        out = [self.sp.bos_id()] if add_bos else []
        for part in self.pattern.split(text):
            if part in self.ids:
                out.append(self.ids[part])
            elif part:
                out += self.sp.encode(part)
        return out


def chat_template(system: str) -> str:
    """InternVL's `internlm2-chat` conversation: `<s>`, then `<|im_start|>role\\n...<|im_end|>`
    turns with NO newline between them, the checkpoint's system message unless the messages
    bring their own. Images render as `<IMG_CONTEXT>\\n` and videos as `<video>\\n` (the
    transformers InternVL processor expands both)."""
    system_js = system.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return (
        "{{ bos_token }}"
        "{% if messages[0]['role'] != 'system' %}"
        "<|im_start|>system\n" + "{{ '" + system_js + "' }}" + "<|im_end|>"
        "{% endif %}"
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}<IMG_CONTEXT>\n"
        "{% elif part['type'] == 'video' %}<video>\n"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
