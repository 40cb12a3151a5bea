"""lmgen.tokenizer.Tokenizer against real oracles: transformers (GGUF and saved folder), SentencePiece, tiktoken."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging

import pytest
from conftest_tokenizer_helpers import sentencepiece_to_gguf, train_sentencepiece

from lmgen.tokenizer.gguf import vocab as gguf_vocab
from lmgen.tokenizer.tokenizer import Tokenizer
from lmgen.tokenizer.from_tiktoken import LLAMA3_PATTERN, llama3_special_tokens

CHINESE_PARAGRAPH = (
    "大语言模型是一种基于深度学习的人工智能模型，它通过在海量文本上进行训练来学习语言的规律。"
    "模型一次生成一个词元（token），每个词元可能只是一个汉字的一部分；流式输出时必须等到字符完整才能显示。"
    "例如：“你好，世界！”——这句话包含全角标点。"
)

PYTHON_CODE = (
    "def fib(n: int) -> int:\n"
    "    if n < 2:\n"
    "        return n  # base case\n"
    "\treturn fib(n - 1) + fib(n - 2)\n"
    "\n\n"
    "x = [12345, 3.14159, 0x1F, 1e-9]    # several   spaces\n"
    "print(f\"{x!r:>10}\")\t\t# tabs\n"
)

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 9:30 AM; we'll see, I'M SURE!",
    "chinese": "大语言模型 generates tokens",
    "chinese_paragraph": CHINESE_PARAGRAPH,
    "emoji": "Family: 👩‍👩‍👧 and 👨‍👩‍👧‍👦, thumbs 👍🏽, flag 🇫🇷, heart ❤️, coder 🧑‍💻!",
    "code": PYTHON_CODE,
    "numbers": "12345 + 678 = 13023, pi≈3.14159, 2024-06-01",
    "chat_specials": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "specials_glued": "text<|im_end|><|im_start|>system<|endoftext|>end",
    "whitespace": "  leading, trailing   \n\n\n  \t mixed \r\n",
    "accents": "Café déjà vu — naïve coöperation, Ångström, ñandú.",
    "empty": "",
}


# --- the embedded GGUF (byte-level BPE, tokenizer.ggml.pre = smollm) --------------------------------


@pytest.fixture(scope="module")
def smol_reader(gguf_path):
    import gguf

    return gguf.GGUFReader(str(gguf_path))


@pytest.fixture(scope="module")
def smol(smol_reader):
    return Tokenizer.from_gguf(smol_reader)


@pytest.mark.parametrize("name", list(TEXTS))
def test_gguf_ids_match_transformers(smol, hf_smol_tokenizer, name):
    text = TEXTS[name]
    ids = smol.encode(text)
    assert ids == hf_smol_tokenizer(text).input_ids
    assert ids == smol.encode(text, add_special_tokens=False)  # SmolLM2: no BOS is added
    assert smol.decode(ids) == text  # byte-level BPE is lossless
    assert smol.decode(ids) == hf_smol_tokenizer.decode(ids)


def test_gguf_digits_split_like_smollm_tokenizer_json(smol, hf_smol_tokenizer):
    """`pre = smollm` splits every digit, any script (llama.cpp's `\\p{N}` first pass; SmolLM2's tokenizer.json
    has Digits(individual_digits=True) before ByteLevel). transformers' GGUF loader ignores `pre`, so the
    oracle here is its tokenizer with SmolLM2's own pre-tokenizer put back."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    oracle = HFTokenizer.from_str(hf_smol_tokenizer.backend_tokenizer.to_str())
    oracle.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    for text in ["circled ①② and Arabic ٣٤٥ digits", "½ ⅔ Ⅻ x²", TEXTS["numbers"], PYTHON_CODE]:
        assert smol.encode(text) == oracle.encode(text, add_special_tokens=False).ids
    # where a digit follows a space the split matters: "Ġ①②" is one pre-token for GPT-2's regex
    assert smol.encode(" ①②") != hf_smol_tokenizer(" ①②").input_ids


def test_gguf_special_tokens(smol, hf_smol_tokenizer):
    assert smol.vocab_size == 49152 == len(hf_smol_tokenizer)
    assert smol.bos_token_id == 1 and smol.bos_token == "<|im_start|>"  # tokenizer.ggml.bos_token_id = 1
    assert smol.eos_token_id == 2 and smol.eos_token == "<|im_end|>"  # tokenizer.ggml.eos_token_id = 2
    assert smol.unk_token_id == 0 and smol.unk_token == "<|endoftext|>"  # tokenizer.ggml.unknown_token_id = 0
    assert smol.pad_token_id == 2  # tokenizer.ggml.padding_token_id = 2 (<|im_end|>)
    assert smol.add_bos_token is False  # tokenizer.ggml.add_bos_token = false
    # every end token: <|im_end|> (metadata eos, ChatML end of turn) and <|endoftext|> (end of document)
    assert smol.eos_token_ids == frozenset({0, 2})
    # the 17 control tokens (<|endoftext|>, <|im_start|>, <|im_end|>, <repo_name>, ..., <empty_output>)
    assert smol.all_special_ids == set(range(17))
    assert set(hf_smol_tokenizer.all_special_ids) <= smol.all_special_ids
    assert smol.token_to_id("<|im_start|>") == 1
    assert smol.token_to_id("<jupyter_code>") == 13
    assert smol.token_to_id("no such piece") is None
    ids = smol.encode(TEXTS["chat_specials"])
    assert ids[:3] == [1, 4093, 198]  # <|im_start|> "user" "\n"
    assert smol.convert_ids_to_tokens(ids[:6]) == ["<|im_start|>", "user", "Ċ", "hi", "<|im_end|>", "Ċ"]
    assert smol.convert_ids_to_tokens(smol.encode(" hello world")) == ["Ġhello", "Ġworld"]
    assert smol.decode(ids, skip_special_tokens=True) == "user\nhi\nassistant\n"
    assert smol.decode(ids, skip_special_tokens=True) == hf_smol_tokenizer.decode(ids, skip_special_tokens=True)
    assert smol.chat_template is not None and "<|im_start|>" in smol.chat_template
    assert smol.chat_templates == {"default": smol.chat_template}
    with pytest.raises(ValueError, match="99999"):
        smol.convert_ids_to_tokens([99999])


def test_gguf_chat_template_render(smol, hf_smol_tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    text = smol.apply_chat_template(messages)
    assert text == hf_smol_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = smol.apply_chat_template(messages, tokenize=True)
    assert ids == hf_smol_tokenizer(text, add_special_tokens=False).input_ids
    assert ids[0] == 1  # the template itself writes <|im_start|>
    chatml = smol.apply_chat_template(messages, chat_template="chatml", add_generation_prompt=False)
    assert chatml == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"


# --- a Hugging Face folder -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_folder(tmp_path_factory, hf_smol_tokenizer):
    folder = tmp_path_factory.mktemp("smol_hf")
    hf_smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", list(TEXTS))
def test_hf_folder_ids_match_transformers(smol_folder, smol, hf_smol_tokenizer, name):
    tok = Tokenizer.from_hf_folder(smol_folder)
    text = TEXTS[name]
    assert tok.encode(text) == hf_smol_tokenizer(text).input_ids
    assert tok.encode(text) == smol.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_hf_folder_config(tmp_path, smol_folder):
    """A post-processor that adds BOS, generation_config eos lists, named chat templates: checked against
    transformers loading the same folder."""
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    tokenizer_json = json.loads((smol_folder / "tokenizer.json").read_text())
    tokenizer_json["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    config = json.loads((smol_folder / "tokenizer_config.json").read_text())
    config.update(
        bos_token={"content": "<|im_start|>", "special": True, "__type": "AddedToken"},
        chat_template=[
            {"name": "default", "template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"},
            {"name": "tool_use", "template": "TOOLS{% for m in messages %}{{ m['content'] }}{% endfor %}"},
        ],
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "bos_token_id": 1}))

    tok = Tokenizer.from_hf_folder(folder)
    hf = AutoTokenizer.from_pretrained(str(folder))
    assert tok.add_bos_token is True  # read off the post-processor
    for text in ["hello world", TEXTS["chat_specials"], ""]:
        assert tok.encode(text) == hf(text).input_ids
        assert tok.encode(text)[0] == 1
        assert tok.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False).input_ids
    # eos: tokenizer_config's <|im_end|> (2), generation_config's [2, 7], and <|endoftext|> (0)
    assert tok.eos_token_id == 2
    assert tok.eos_token_ids == frozenset({0, 2, 7})
    assert set(tok.chat_templates) == {"default", "tool_use"}
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == "hi"
    assert tok.apply_chat_template(messages, chat_template="tool_use") == "TOOLShi"

    # chat_template.jinja wins over tokenizer_config.json, as in transformers
    (folder / "chat_template.jinja").write_text("J{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert Tokenizer.from_hf_folder(folder).apply_chat_template(messages) == "Jhi"
    assert AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(messages, tokenize=False) == "Jhi"

    # An explicit add_bos_token in tokenizer_config.json wins over the post-processor, as llama.cpp's
    # converter and transformers 4 read it (transformers 5 ignores the flag when tokenizer.json exists).
    config["add_bos_token"] = False
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_hf_folder(folder)
    assert tok.add_bos_token is False
    assert tok.encode("hello world") == hf("hello world").input_ids[1:]


def test_hf_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)
    with pytest.raises(ValueError, match="nowhere"):
        Tokenizer.from_hf_folder(tmp_path / "nowhere")


# --- SentencePiece vocabulary in a GGUF (tokenizer.ggml.model = llama) ------------------------------


@pytest.fixture(scope="module")
def spm_files(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("spm")
    model = train_sentencepiece(workdir)
    return model, sentencepiece_to_gguf(model, workdir / "tiny-spm.gguf")


@pytest.fixture(scope="module")
def spm(spm_files):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(spm_files[0]))


@pytest.fixture(scope="module")
def spm_tok(spm_files):
    return Tokenizer.from_gguf(str(spm_files[1]))


SPM_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "大语言模型 generates tokens",  # not in the training text: byte fallback
    CHINESE_PARAGRAPH,
    "emoji 👩‍👩‍👧 ok 🇫🇷",
    "  leading and  double  spaces  ",
    " ",
    "line one\nline two\n\n\ttabbed",
    "Numbers 12345 and 3.14",
    "Zürich, naïve, Ångström",
    "",
]


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_sentencepiece_gguf_matches_sentencepiece(spm_tok, spm, text):
    ids = spm_tok.encode(text, add_special_tokens=False)
    assert ids == spm.encode(text)
    assert spm_tok.decode(ids) == spm.decode(ids) == text
    assert spm_tok.encode(text) == [spm.bos_id()] + ids  # llama vocabularies add BOS by default


def test_sentencepiece_gguf_details(spm_tok, spm):
    byte_ids = set(range(4, 4 + 256))  # <0x00>..<0xFF> follow <unk> <s> </s> <tool>
    ids = spm_tok.encode("大", add_special_tokens=False)
    assert spm_tok.convert_ids_to_tokens(ids) == ["▁", "<0xE5>", "<0xA4>", "<0xA7>"]
    assert set(ids[1:]) <= byte_ids
    assert spm_tok.decode(ids[:2]) == "\ufffd"  # half a character (the leading space is stripped)
    assert spm_tok.bos_token == "<s>" and spm_tok.eos_token == "</s>" and spm_tok.unk_token == "<unk>"
    assert spm_tok.eos_token_ids == frozenset({2})
    assert spm_tok.all_special_ids == {0, 1, 2}
    # control-token text in the input is the control token (transformers does the same)
    assert spm_tok.encode("x</s>", add_special_tokens=False)[-1] == 2
    # the user-defined token is matched whole, like SentencePiece does
    tool = spm_tok.token_to_id("<tool>")
    assert tool == 3 and tool in spm.encode("use <tool> now")
    assert tool in spm_tok.encode("use <tool> now")
    # as llama.cpp does, text after a matched token gets the space prefix again (SentencePiece itself
    # never sees tokens in the text, so it differs there)
    ids = spm_tok.encode("use <tool>now", add_special_tokens=False)
    assert spm_tok.convert_ids_to_tokens(ids)[ids.index(tool) + 1].startswith("▁")
    assert spm_tok.decode(ids) == spm.decode(ids) == "use <tool> now"
    with pytest.raises(ValueError, match="--chat-template"):
        spm_tok.apply_chat_template([{"role": "user", "content": "hi"}])
    # a built-in template works for a model without one
    text = spm_tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="llama2")
    assert text.startswith("<s>[INST]") and "hi" in text


def test_sentencepiece_gguf_decodes_invalid_bytes_like_sentencepiece(spm_tok, spm):
    """Each byte that is not part of a valid character is one U+FFFD, and complete characters before it
    stay (tokenizers' ByteFallback would turn the whole run of byte tokens into U+FFFDs)."""

    def byte_ids(*values):
        return [spm.piece_to_id(f"<0x{v:02X}>") for v in values]

    for ids in [
        byte_ids(0xCC, 0x80, 0xCC),  # a combining grave accent, then half of another
        byte_ids(0xE4, 0xB8),  # two thirds of a CJK character
        byte_ids(0xE4, 0xB8) + spm.encode("A"),
        byte_ids(0xFF, 0x41),
        spm.encode("x") + byte_ids(0xF0, 0x9F, 0x91),
    ]:
        assert spm_tok.decode(ids) == spm.decode(ids)
    assert spm_tok.decode(byte_ids(0xCC, 0x80, 0xCC)) == "\u0300\ufffd"


def test_hf_folder_sentencepiece(tmp_path, spm_files, spm):
    """A Llama-2 style folder, as transformers writes it from the SentencePiece model: same ids as transformers,
    and decoding like SentencePiece."""
    import shutil

    from transformers import AutoTokenizer, LlamaTokenizer

    source = tmp_path / "sp"
    source.mkdir()
    shutil.copy(spm_files[0], source / "tokenizer.model")
    LlamaTokenizer.from_pretrained(str(source)).save_pretrained(str(tmp_path / "hf"))
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    tok = Tokenizer.from_hf_folder(tmp_path / "hf")
    for text in SPM_TEXTS:
        ids = tok.encode(text)
        assert ids == hf(text).input_ids
        assert tok.decode(ids) == hf.decode(ids)
    assert tok.bos_token == "<s>" and tok.eos_token_ids == frozenset({2})
    broken = [spm.piece_to_id("<0xCC>"), spm.piece_to_id("<0x80>"), spm.piece_to_id("<0xCC>")]
    assert tok.decode(broken) == spm.decode(broken) == "\u0300\ufffd"


def test_sentencepiece_gguf_without_space_prefix(spm_files):
    """add_space_prefix = false: the oracle is the same SentencePiece model with add_dummy_prefix off."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_files[0].read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    vocab = dataclasses.replace(gguf_vocab.read_gguf_vocab(str(spm_files[1])), add_space_prefix=False)
    tok = Tokenizer.from_gguf(vocab)
    assert tok.add_bos_token is True  # the file does not say: llama vocabularies add BOS
    for text in ["Hello world", "  two leading", "大 x", ""]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text)
        assert tok.decode(ids) == sp.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok.encode("Hello", add_special_tokens=False))[0] == "H"


# --- tiktoken (Llama 3's original tokenizer.model format) ------------------------------------------


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory, smol_reader):
    """SmolLM2's byte-level vocabulary written as a tiktoken file (rank = token id, normal tokens only)."""
    tokens = smol_reader.fields["tokenizer.ggml.tokens"].contents()
    types = smol_reader.fields["tokenizer.ggml.token_type"].contents()
    lines = [
        f"{base64.b64encode(bytes(gguf_vocab.BYTE_DECODER[c] for c in tok)).decode()} {i}"
        for i, (tok, kind) in enumerate(zip(tokens, types))
        if kind == gguf_vocab.TOKEN_NORMAL
    ]
    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    path.write_text("\n".join(lines) + "\n")
    specials = {tok: i for i, (tok, kind) in enumerate(zip(tokens, types)) if kind == gguf_vocab.TOKEN_CONTROL}
    return path, specials


# SmolLM's two llama.cpp regexes ("\p{N}" then GPT-2's) as one tiktoken pattern
SMOLLM_PATTERN = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


@pytest.mark.parametrize("name", list(TEXTS))
def test_tiktoken_matches_tiktoken_and_gguf(tiktoken_file, smol, name):
    import tiktoken

    path, specials = tiktoken_file
    tok = Tokenizer.from_tiktoken(
        path, specials, SMOLLM_PATTERN, bos_token="<|im_start|>", eos_token="<|im_end|>", add_bos_token=False
    )
    ranks = {base64.b64decode(a): int(b) for a, b in (line.split() for line in path.read_text().splitlines())}
    enc = tiktoken.Encoding("oracle", pat_str=SMOLLM_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    text = TEXTS[name]
    ids = tok.encode(text)
    assert ids == enc.encode(text, allowed_special="all")
    assert ids == smol.encode(text)  # ranks are SmolLM's merge order, so the same ids
    assert tok.decode(ids) == enc.decode(ids) == text
    assert tok.convert_ids_to_tokens(ids) == smol.convert_ids_to_tokens(ids)


def test_tiktoken_special_tokens_and_bos(tiktoken_file):
    path, specials = tiktoken_file
    tok = Tokenizer.from_tiktoken(path, specials, SMOLLM_PATTERN, bos_token="<|im_start|>", eos_token="<|im_end|>")
    assert tok.add_bos_token is True
    assert tok.encode("hi") == [1, tok.encode("hi", add_special_tokens=False)[0]]
    assert tok.eos_token_ids == frozenset({0, 2})  # <|im_end|> and <|endoftext|>
    assert tok.decode(tok.encode("a<|im_end|>b"), skip_special_tokens=True) == "ab"
    assert tok.decode(tok.encode("a<|im_end|>b")) == "<|im_start|>a<|im_end|>b"
    assert tok.token_to_id("Ġworld") == 905 and tok.token_to_id("<|im_end|>") == 2
    assert tok.vocab_size == 49152


def test_tiktoken_llama3_pattern_against_byte_level_builder(tiktoken_file, smol_reader):
    """The `llama-bpe` pre-tokenizer (Split regex + ignore_merges) over a GGUF vocabulary agrees with tiktoken
    running the Llama 3 pattern over the same ranks: tiktoken looks a whole pre-token up first, as
    ignore_merges does."""
    path, specials = tiktoken_file
    tik = Tokenizer.from_tiktoken(path, specials, LLAMA3_PATTERN)
    vocab = dataclasses.replace(gguf_vocab.read_gguf_vocab(smol_reader), pre="llama-bpe", add_bos_token=None)
    tk = gguf_vocab.build_tokenizer(vocab)
    assert vocab.default_add_bos() is True  # llama.cpp adds BOS for llama-bpe vocabularies
    for text in TEXTS.values():
        assert tk.encode(text, add_special_tokens=False).ids == tik.encode(text, add_special_tokens=False)
    # Llama 3's regex: digits in groups of up to three, a contraction on its own
    pieces = [piece for piece, _ in tk.pre_tokenizer.pre_tokenize_str("12345 it's")]
    assert pieces == ["123", "45", "Ġit", "'s"]


def test_llama3_special_tokens():
    specials = llama3_special_tokens()
    assert specials["<|begin_of_text|>"] == 128000
    assert specials["<|end_of_text|>"] == 128001
    assert specials["<|eom_id|>"] == 128008
    assert specials["<|eot_id|>"] == 128009
    assert specials["<|reserved_special_token_246|>"] == 128255
    assert len(specials) == 256 and sorted(specials.values()) == list(range(128000, 128256))


def test_tiktoken_errors(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match=r"bad\.model:2"):
        Tokenizer.from_tiktoken(bad, {}, LLAMA3_PATTERN)
    with pytest.raises(ValueError, match="missing.model"):
        Tokenizer.from_tiktoken(tmp_path / "missing.model", {}, LLAMA3_PATTERN)
    clash = tmp_path / "clash.model"
    clash.write_text("IQ== 0\n")
    with pytest.raises(ValueError, match="collide"):
        Tokenizer.from_tiktoken(clash, {"<s>": 0}, LLAMA3_PATTERN)


# --- GGUF errors and fallbacks ---------------------------------------------------------------------


def _write_gguf(path, **kv):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in kv.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_errors(tmp_path):
    import gguf

    path = _write_gguf(tmp_path / "bert.gguf", **{"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ValueError, match="'bert'"):
        Tokenizer.from_gguf(gguf.GGUFReader(str(path)))
    path = _write_gguf(tmp_path / "none.gguf", **{"general.name": "no tokenizer"})
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf(str(path))
    path = _write_gguf(tmp_path / "nomerges.gguf", **{"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ValueError, match="merges"):
        Tokenizer.from_gguf(str(path))


def test_gguf_unknown_pre_falls_back_to_gpt2(smol_reader, hf_smol_tokenizer, caplog):
    vocab = dataclasses.replace(gguf_vocab.read_gguf_vocab(smol_reader), pre="no-such-pre")
    with caplog.at_level(logging.WARNING, logger="lmgen.tokenizer.gguf.vocab"):
        tk = gguf_vocab.build_tokenizer(vocab)
    assert "no-such-pre" in caplog.text
    # GPT-2's regex is what transformers' GGUF loader uses for every byte-level vocabulary
    for text in [*TEXTS.values(), " ①② 12"]:
        assert tk.encode(text, add_special_tokens=False).ids == hf_smol_tokenizer(text).input_ids


def test_qwen2_pre_normalizes_nfc(smol_reader):
    vocab = dataclasses.replace(gguf_vocab.read_gguf_vocab(smol_reader), pre="qwen2")
    tk = gguf_vocab.build_tokenizer(vocab)
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert tk.encode(decomposed).ids == tk.encode(composed).ids
    assert tk.encode("abc 123").tokens == ["abc", "Ġ", "1", "2", "3"]  # qwen2: single digits, space apart
