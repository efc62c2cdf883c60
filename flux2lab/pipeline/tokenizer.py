"""An offline Mistral-style tokenizer and Pixtral processor for the built-in models.

FLUX.2 [dev] encodes prompts with Mistral Small 3.1 through a `PixtralProcessor` and a chat template. The
real tokenizer cannot be downloaded here, so the built-in models (`tiny`, `mini`) get one built in code with
the `tokenizers` library: a word-level BPE trained on a fixed corpus (the FLUX.2 system message plus a
vocabulary of everyday prompt words), the special tokens Mistral uses, and a chat template of the same
shape. Training on a fixed corpus is deterministic, so the same tokenizer comes out on every machine.
"""

from __future__ import annotations

import functools

from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PixtralImageProcessor, PixtralProcessor, PreTrainedTokenizerFast

# Token ids follow Mistral's convention (unk 0, bos 1, eos 2) so model configs can name them.
SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[IMG]", "[IMG_BREAK]", "[IMG_END]",
)
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
IMAGE_TOKEN_ID = SPECIAL_TOKENS.index("[IMG]")
VOCAB_SIZE = 2048
# Reference images: the processor's resize and patching, and the text encoder's Pixtral vision tower, must agree.
IMAGE_SIZE, PATCH_SIZE = 64, 8

# Words prompts are made of: the built-in world's captions (shapes, colours, places, sizes) and the
# subjects, styles and scene words of the calibration and quality prompt sets. Anything else still
# tokenizes, character by character.
_WORDS = """
a an the of in on at above below under over beside next to left right top bottom middle center corner
and with without behind front near far small large big tiny huge little tall short wide long round
circle square triangle rectangle star ring line dot shape shapes background plain textured striped dotted
red green blue yellow orange purple pink white black gray grey brown cyan magenta gold silver
cat dog bird horse fish tree flower house city street car boat ship mountain river lake sea ocean beach
forest sky cloud clouds sun moon stars night day morning evening sunset sunrise rain snow storm fog
man woman child people couple person portrait face hands eyes hair dress suit hat evening wear
sleeping sitting standing walking running flying dancing reading painting holding looking
sofa chair table window door room kitchen garden bridge tower castle road field market cafe
photo photograph painting illustration drawing render cinematic realistic detailed lighting light shadow
soft warm cold bright dark colorful vintage modern futuristic ancient old new wooden glass metal stone
close up wide shot view style of by from into through while during is are was very highly
""".split()


def _corpus() -> list[str]:
    return [SYSTEM_MESSAGE, " ".join(_WORDS), *_WORDS]


# Mistral's chat layout: <s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]; image content becomes one
# [IMG] placeholder that the processor expands.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{% else %}[INST]{% endif %}"
    "{% for part in parts %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}[IMG]{% endif %}"
    "{% endfor %}"
    "{% if message['role'] == 'system' %}[/SYSTEM_PROMPT]{% else %}[/INST]{% endif %}"
    "{% endfor %}"
)


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), show_progress=False, min_frequency=1
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fast tokenizer with Mistral's special tokens and a chat template, built offline."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )


def build_processor() -> PixtralProcessor:
    """The processor `Flux2Pipeline` calls as `tokenizer`: Pixtral's, around the offline tokenizer."""
    image_processor = PixtralImageProcessor(
        size={"longest_edge": IMAGE_SIZE}, patch_size={"height": PATCH_SIZE, "width": PATCH_SIZE}
    )
    return PixtralProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=PATCH_SIZE,
        chat_template=CHAT_TEMPLATE,
    )
