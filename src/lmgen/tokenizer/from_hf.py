"""Builds a `Tokenizer` from a Hugging Face folder (`Tokenizer.from_hf_folder`): tokenizer.json plus the
special tokens, BOS/EOS flags and chat templates that tokenizer_config.json, special_tokens_map.json,
generation_config.json and the chat_template files add to it, read as transformers reads them."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken

from lmgen.tokenizer.backends import SentencePieceBackend, TokenizersBackend, spm_decoder_strip


logger = logging.getLogger(__name__)


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, str):
        return value
    return str(value)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def hf_folder_tokenizer(cls: type, path: str | os.PathLike) -> "Tokenizer":  # cls(...): the Tokenizer class is passed in, not imported (no cycle)
    """`cls` over a Hugging Face folder: tokenizer.json (required), tokenizer_config.json,
    special_tokens_map.json, generation_config.json, chat_template.jinja / chat_template.json /
    additional_chat_templates/."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise ValueError(f"{tj}: no tokenizer.json in this folder (lmgen needs the fast-tokenizer file)")
    try:
        tk = tokenizers.Tokenizer.from_file(str(tj))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{tj}: cannot be loaded: {e}") from None

    config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    special_map = (
        _read_json(folder / "special_tokens_map.json") if (folder / "special_tokens_map.json").is_file() else {}
    )
    gen = (
        _read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    )

    # Added tokens declared in the config but missing from tokenizer.json.
    for id_str, info in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
        content = info.get("content")
        if not content or tk.token_to_id(content) is not None:
            continue
        token = AddedToken(
            content,
            special=bool(info.get("special", True)),
            normalized=bool(info.get("normalized", False)),
            lstrip=bool(info.get("lstrip", False)),
            rstrip=bool(info.get("rstrip", False)),
            single_word=bool(info.get("single_word", False)),
        )
        (tk.add_special_tokens if token.special else tk.add_tokens)([token])
        if tk.token_to_id(content) != int(id_str):
            logger.warning("%s: added token %r got id %s, not %s", folder, content, tk.token_to_id(content), id_str)

    def special(name: str) -> int | None:
        content = _token_content(config.get(name)) or _token_content(special_map.get(name))
        if content is None:
            return None
        t_id = tk.token_to_id(content)
        if t_id is None:
            tk.add_special_tokens([AddedToken(content, special=True, normalized=False)])
            t_id = tk.token_to_id(content)
        return t_id

    bos_id, eos_id = special("bos_token"), special("eos_token")
    pad_id, unk_id = special("pad_token"), special("unk_token")
    extras = config.get("extra_special_tokens") or []
    if isinstance(extras, dict):
        extras = list(extras.values())
    for extra in list(config.get("additional_special_tokens") or []) + list(extras):
        content = _token_content(extra)
        if content and tk.token_to_id(content) is None:
            tk.add_special_tokens([AddedToken(content, special=True, normalized=False)])

    gen_eos = gen.get("eos_token_id")
    gen_eos_ids = [gen_eos] if isinstance(gen_eos, int) else [int(i) for i in (gen_eos or [])]
    if bos_id is None and isinstance(gen.get("bos_token_id"), int):
        bos_id = gen["bos_token_id"]
    if eos_id is None and gen_eos_ids:
        eos_id = gen_eos_ids[0]
    if pad_id is None and isinstance(gen.get("pad_token_id"), int):
        pad_id = gen["pad_token_id"]

    # What encode(add_special_tokens=True) adds: tokenizer_config's flags when it has them (transformers
    # rebuilds the post-processor from them), else whatever tokenizer.json's post-processor adds.
    plain = tk.encode("a", add_special_tokens=False).ids
    full = tk.encode("a", add_special_tokens=True).ids
    prefix_ids, suffix_ids = _split_around(full, plain)
    if "add_bos_token" in config:
        prefix_ids = [bos_id] if config["add_bos_token"] and bos_id is not None else []
    if "add_eos_token" in config:
        suffix_ids = [eos_id] if config["add_eos_token"] and eos_id is not None else []
    tk.post_processor = None

    chat_template, named = _hf_chat_templates(folder, config)
    strip = spm_decoder_strip(tk)
    backend = TokenizersBackend(tk) if strip is None else SentencePieceBackend(tk, (), strip)
    return cls(
        backend,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        extra_eos_token_ids=gen_eos_ids,
        pad_token_id=pad_id,
        unk_token_id=unk_id,
        prefix_ids=prefix_ids,
        suffix_ids=suffix_ids,
        chat_template=chat_template,
        chat_templates=named,
        name=folder.name,
    )


def _split_around(full: list[int], plain: list[int]) -> tuple[list[int], list[int]]:
    """The ids a post-processor put before and after `plain` in `full`."""
    n = len(plain)
    for start in range(len(full) - n + 1):
        if full[start : start + n] == plain:
            return full[:start], full[start + n :]
    return [], []


def _hf_chat_templates(folder: Path, config: Mapping[str, Any]) -> tuple[str | None, dict[str, str]]:
    """(default template, named templates) from chat_template.jinja / .json, additional_chat_templates/ and
    tokenizer_config.json's `chat_template` (a string, or a list of {name, template})."""
    default: str | None = None
    named: dict[str, str] = {}
    raw = config.get("chat_template")
    if isinstance(raw, str):
        default = raw
    elif isinstance(raw, list):
        for item in raw:
            if isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("template"), str):
                named[item["name"]] = item["template"]
        default = named.pop("default", None)
    if (folder / "chat_template.json").is_file():
        data = _read_json(folder / "chat_template.json")
        if isinstance(data.get("chat_template"), str):
            default = data["chat_template"]
    if (folder / "chat_template.jinja").is_file():
        default = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        for file in sorted(extra.glob("*.jinja")):
            named[file.stem] = file.read_text(encoding="utf-8")
    return default, named
