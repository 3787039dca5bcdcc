"""Text <-> token ids for the runtime, from a model's Hugging Face tokenizer files, without
transformers: the `tokenizers` library runs tokenizer.json, jinja2 renders the chat template.

What transformers adds on top of tokenizer.json is reproduced here where it changes results, and
the tests hold both models of ../shared/models to `AutoTokenizer`'s ids, text and chat strings:

- BOS/EOS insertion comes from tokenizer.json's post-processor alone.  transformers 5 drops
  `add_bos_token`/`add_eos_token` from tokenizer_config.json whenever tokenizer.json exists, so
  those flags are deliberately not applied.
- The chat template runs in jinja2's immutable sandbox with transformers' settings and helpers.
  Templates ship with downloaded models, so they are untrusted: unlike transformers, touching an
  unsafe attribute fails at once instead of rendering as an empty string, and a render is bounded
  in steps, time, value sizes and output (runtime/chat_template.py).
- Tokenizer files are untrusted too: any malformed, oversized or non-UTF-8 one is a TokenizerError
  naming it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping, Sequence

from tokenizers import Tokenizer as _Backend

from . import chat_template
from .errors import clip as _clip

# Named special tokens that transformers passes to every chat template as variables.
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")

# The files a tokenizer directory may hold that are read here.
_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "generation_config.json", "chat_template.jinja")

_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")

# Largest tokenizer files read, in bytes: real tokenizer.json files reach ~35 MB (262k-token
# vocabularies), configs and templates ~100 KB.
_MAX_TOKENIZER_JSON = 256 << 20
_MAX_CONFIG_FILE = 16 << 20


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or a chat template that cannot be rendered; the message
    names the file."""


class Tokenizer:
    """A loaded tokenizer: `encode`/`decode` as `AutoTokenizer` does, the chat template, and
    incremental decoding for streaming."""

    def __init__(self, backend: _Backend, *, bos_token_id: int | None = None,
                 eos_token_ids: Iterable[int] = (), special_tokens: Mapping[str, str] | None = None,
                 chat_template: str | None = None, chat_template_source: str = "<chat template>"):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = frozenset(eos_token_ids)
        self.special_tokens = dict(special_tokens or {})
        self.chat_template = chat_template
        self.chat_template_source = chat_template_source
        self.byte_token_ids = _byte_token_ids(backend)
        self.special_token_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items()
                                           if t.special)
        self._pieces: dict[int, str] = {}
        self._piece_anchor = backend.encode("a", add_special_tokens=False).ids[-1:]

    @classmethod
    def from_dir(cls, path: str | Path, *, only: Collection[str] | None = None) -> Tokenizer:
        """Load tokenizer.json (required), tokenizer_config.json, special_tokens_map.json,
        generation_config.json and chat_template.jinja (optional) from a directory.  `only`
        names the files the caller vouches for (an artifact's hash-checked list); any other
        file is treated as absent and never opened."""
        path = Path(path)
        files = {name: path / name for name in _FILES
                 if (only is None or name in only) and (path / name).is_file()}
        tokenizer_json = path / "tokenizer.json"
        if "tokenizer.json" not in files:
            raise TokenizerError(f"{tokenizer_json}: missing (a tokenizer needs its tokenizer.json)")
        text = _read_text(tokenizer_json, _MAX_TOKENIZER_JSON)
        try:
            backend = _Backend.from_str(text)
            # a post-processor naming a token the vocabulary lacks loads fine and panics on every
            # encode: one probe here names the file instead
            backend.decode(backend.encode("a b", add_special_tokens=True).ids)
        except BaseException as e:  # tokenizers raises a bare Exception, or pyo3's PanicException
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                raise               # (a BaseException) when its Rust code panics
            raise TokenizerError(f"{tokenizer_json}: not a valid tokenizer ({_clip(str(e))})") from None

        config_file, map_file = path / "tokenizer_config.json", path / "special_tokens_map.json"
        config = _read_json(files.get("tokenizer_config.json"))
        # special_tokens_map.json is the older home of the named tokens; the config wins
        token_map = _read_json(files.get("special_tokens_map.json"))
        sources = {key: config_file if key in config else map_file for key in _SPECIAL_TOKEN_KEYS}
        special = _special_tokens({**token_map, **config}, sources)

        def token_id(key: str) -> int | None:
            if key not in special:
                return None
            tid = backend.token_to_id(special[key])
            if tid is None:
                raise TokenizerError(f"{sources[key]}: {key} {special[key]!r} is not in the vocabulary")
            return tid

        generation_file = path / "generation_config.json"
        generation = _read_json(files.get("generation_config.json"))
        bos = token_id("bos_token")
        if bos is None:
            bos = min(_token_ids(generation.get("bos_token_id"), generation_file, "bos_token_id",
                                 backend), default=None)
        eos = _token_ids(generation.get("eos_token_id"), generation_file, "eos_token_id", backend)
        if (tid := token_id("eos_token")) is not None:
            eos.add(tid)

        template, source = _chat_template(files.get("chat_template.jinja"), config, config_file)
        return cls(backend, bos_token_id=bos, eos_token_ids=eos, special_tokens=special,
                   chat_template=template, chat_template_source=source)

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer knows, added tokens included (`len(AutoTokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def piece(self, token_id: int) -> str:
        """One token's text as it reads inside a sequence (logprobs: `tokens`, `top_logprobs`).
        Decoding it alone would lose what decoders strip from a sequence's start (SentencePiece's
        leading space), so it is decoded after a plain letter and the letter's text removed.
        Special tokens keep their text; a lone byte of a multi-byte character reads U+FFFD."""
        cached = self._pieces.get(token_id)
        if cached is None:
            ref = self._piece_anchor
            head = self.backend.decode(ref, skip_special_tokens=False)
            text = self.backend.decode(ref + [int(token_id)], skip_special_tokens=False)
            cached = text[len(head):] if text.startswith(head) else \
                self.backend.decode([int(token_id)], skip_special_tokens=False)
            if len(self._pieces) < 1 << 20:
                self._pieces[token_id] = cached
        return cached

    def stream(self, context: Sequence[int] = (), skip_special_tokens: bool = True) -> StreamDecoder:
        """An incremental decoder.  `context` (the prompt) is decoded with the new tokens but
        never returned: it decides how they join on, e.g. whether SentencePiece's leading
        space of the first new word is kept."""
        return StreamDecoder(self, context, skip_special_tokens)

    # --- chat ----------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation, as transformers' `apply_chat_template(messages,
        tokenize=False)` renders it; encode it with `add_special_tokens=False` (the template
        writes its own special tokens)."""
        where = self.chat_template_source
        if self.chat_template is None:
            raise TokenizerError(f"{where}: this model has no chat template; use plain completion")
        if not messages:
            raise TokenizerError("apply_chat_template: the conversation is empty")
        # transformers drops None-valued keys (APIs send content=None) and hands templates plain
        # data only, so that nothing the template sees has methods worth abusing
        messages = [{k: chat_template.plain(v) for k, v in m.items() if v is not None} for m in messages]
        variables = {**self.special_tokens, "messages": messages, "tools": None, "documents": None,
                     "add_generation_prompt": add_generation_prompt}
        try:
            return chat_template.render(self.chat_template, variables)
        except chat_template.ChatTemplateError as e:
            raise TokenizerError(f"{where}:{e}") from None   # where:line: for syntax errors, where: else


class StreamDecoder:
    """Turns tokens pushed one at a time into text pieces: each `push` returns only text not
    returned before.  It holds text back while it may still change:

    - while it ends in U+FFFD, the mark of a UTF-8 character split across byte-level tokens;
    - while the tokens end in a run of SentencePiece byte tokens (<0xE2>): the ByteFallback
      decoder turns a whole run into U+FFFDs if any byte of it is invalid, so a run's text is
      only known once a token of another kind follows.

    At the end of a sequence `flush()` returns what is still held; then "".join(pieces) equals
    the decoded text.  Decoding only a window of recent tokens keeps each push cheap.  The
    window always starts with tokens already returned, so decoders that treat the first token
    specially (the SentencePiece leading-space strip) affect text that was already counted."""

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int], skip_special_tokens: bool):
        self._tokenizer, self._skip = tokenizer, skip_special_tokens
        self._ids = [int(i) for i in context]
        self._start, self._read = 0, len(self._ids)    # window start, end of returned tokens
        self._read_text = self._decode(self._start, self._read)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        if self._in_byte_run():
            return ""
        text = self._decode(self._start, len(self._ids))
        if len(text) <= len(self._read_text) or text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        text = self._decode(self._start, len(self._ids))
        return self._advance(text) if len(text) > len(self._read_text) else ""

    def _in_byte_run(self) -> bool:
        if not self._tokenizer.byte_token_ids:        # no ByteFallback decoder (byte-level BPE)
            return False
        # skipped special tokens vanish before the decoder runs, so they do not end a run
        skipped = self._tokenizer.special_token_ids if self._skip else ()
        last = next((i for i in reversed(self._ids) if i not in skipped), None)
        return last in self._tokenizer.byte_token_ids

    def _advance(self, text: str) -> str:
        new = text[len(self._read_text):]
        self._start, self._read = self._read, len(self._ids)
        self._read_text = self._decode(self._start, self._read)
        return new

    def _decode(self, start: int, stop: int) -> str:
        return self._tokenizer.decode(self._ids[start:stop], skip_special_tokens=self._skip)


# --- loading helpers ---------------------------------------------------------------------------

def _byte_token_ids(backend: _Backend) -> frozenset[int]:
    """Ids of SentencePiece byte tokens (`<0x41>`), if the decoder turns them into bytes."""
    decoder = backend.decoder
    if decoder is None or b'"ByteFallback"' not in decoder.__getstate__():
        return frozenset()
    return frozenset(i for token, i in backend.get_vocab().items() if _BYTE_TOKEN.fullmatch(token))


def _read_text(path: Path, limit: int) -> str:
    """A tokenizer file's text, as text-mode open() reads it (universal newlines), refused with
    an error naming it if over `limit` bytes, unreadable or not UTF-8."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)        # never more than the limit, even if the file grows
    except OSError as e:
        raise TokenizerError(f"{path}: cannot be read ({e.strerror or e})") from None
    if len(data) > limit:
        raise TokenizerError(f"{path}: larger than the {limit} bytes allowed for this file")
    try:
        return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 text ({e})") from None


def _read_json(path: Path | None) -> dict:
    """An optional JSON object file: {} if absent (None), an error naming it if unreadable."""
    if path is None:
        return {}
    text = _read_text(path, _MAX_CONFIG_FILE)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:   # RecursionError: nesting deeper than the stack
        raise TokenizerError(f"{path}: not valid JSON ({_clip(str(e))})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _special_tokens(config: dict, sources: Mapping[str, Path]) -> dict[str, str]:
    """The named special tokens; the config writes each as a string or a serialized AddedToken.
    `sources` names the file each key was read from."""
    special = {}
    for key in _SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        text = value.get("content") if isinstance(value, dict) else value
        if value is not None and not isinstance(text, str):
            raise TokenizerError(f"{sources[key]}: {key} must be a token string, got {_clip(repr(value))}")
        if text is not None:
            special[key] = text
    return special


def _token_ids(value: Any, path: Path, key: str, backend: _Backend) -> set[int]:
    """generation_config.json's token ids: absent, one int, or a list of ints."""
    values = [] if value is None else value if isinstance(value, list) else [value]
    vocab = backend.get_vocab_size(with_added_tokens=True)
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab for v in values):
        raise TokenizerError(f"{path}: {key} must be token ids in [0, {vocab}), got {_clip(repr(value))}")
    return set(values)


def _chat_template(jinja_file: Path | None, config: dict, config_file: Path) -> tuple[str | None, str]:
    """The default chat template and where it came from.  chat_template.jinja takes priority over
    the config's entry, as in transformers."""
    if jinja_file is not None:
        return _read_text(jinja_file, _MAX_CONFIG_FILE), str(jinja_file)
    template = config.get("chat_template")
    if isinstance(template, list):      # named templates: [{"name": ..., "template": ...}]
        named = [t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"]
        template = named[-1] if named else None
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{config_file}: chat_template must be a string or a list of named templates")
    return template, f"{config_file} (chat_template)"
