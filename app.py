"""Gradio demo of a VideoChat-Flash Hub folder: upload or link a video (or an image), ask, ask again.

    python app.py                                  # in an exported folder: the model is that folder
    MODEL_ID=owner/VideoChat-Flash-hf python app.py   # any folder or Hub repo of this package's format (a Space)

The answer streams. Follow-up questions reuse the video's visual tokens and the conversation's KV cache, which
``model.chat`` keeps on the model; a link is downloaded once. A new video, image, link or frame count starts a new
conversation. Plain imports only (a Space runs this file on its own): gradio, torch, transformers; the model's code
comes from its folder (trust_remote_code). The page loads nothing from elsewhere and sends no analytics.
"""

import functools
import os
import threading
from pathlib import Path

import gradio as gr
import torch
from transformers import AutoModel, AutoTokenizer, TextIteratorStreamer
from transformers.dynamic_module_utils import get_class_from_dynamic_module

MODEL_ID = os.environ.get("MODEL_ID", str(Path(__file__).resolve().parent))
DEFAULT_FRAMES = 128
# The original model card's token dropping, made for its 28-layer LLM; a smaller one (the tiny model) keeps the
# stages of its own config.
MODEL_CARD_DROPPING = {"llm_compress_type": "uniform0_attention", "llm_compress_layer_list": [4, 18],
                       "llm_image_token_ratio_list": [1, 0.75, 0.25]}


def load_model(model_id: str = MODEL_ID):
    """``(model, tokenizer, fetch)``: the model on the GPU in bfloat16 when there is one, and its folder's
    ``video_loading.fetch_media`` (local copies of uploads and links)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModel.from_pretrained(model_id, trust_remote_code=True, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    return model, tokenizer, get_class_from_dynamic_module("video_loading.fetch_media", model_id)


def local_copy(fetch, source: str, uploaded: bool):
    """A copy of an upload (its path on the server) or a link that stays as it is for the whole conversation, so
    that follow-up questions find its visual tokens in chat()'s cache, which is keyed on the file's modification
    time: gradio touches an upload whenever a client sends it again."""
    if not uploaded:
        return fetch(source)  # (a link, never a path on the server: fetch_media reads only http(s) and data: URLs)
    with open(source, "rb") as file:
        return fetch(file)


def set_token_dropping(model, on: bool) -> None:
    """The model card's switch: ``mm_llm_compress`` with its stages where the LLM is deep enough for them."""
    config = model.config
    if on and config.num_hidden_layers > max(MODEL_CARD_DROPPING["llm_compress_layer_list"]):
        for name, value in MODEL_CARD_DROPPING.items():
            setattr(config, name, value)
    config.mm_llm_compress = bool(on)


def streamed_chat(model, tokenizer, media, question, history, max_num_frames):
    """``model.chat`` in a thread: ``(answer so far, None)`` piece by piece, then ``(answer, its chat history)``."""
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = {}

    def run():
        try:
            result["answer"] = model.chat(media, tokenizer, question, chat_history=history, return_history=True,
                                          max_num_frames=max_num_frames, generation_config={"streamer": streamer})
        except Exception as error:  # noqa: BLE001 - shown to the user below
            result["error"] = error
            streamer.end()  # (no answer is coming: stop the loop below)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    answer = ""
    try:
        for piece in streamer:
            answer += piece
            yield answer, None
    finally:  # also when the client goes away mid-answer: the next request must not share the model with this one
        thread.join()
    if "error" in result:
        raise gr.Error(str(result["error"]))
    yield result["answer"]


def build_demo(model, tokenizer, fetch) -> gr.Blocks:
    """The page: media on the left (video, image or link; frames; token dropping), the conversation on the right."""
    copies = functools.lru_cache(maxsize=4)(functools.partial(local_copy, fetch))  # for follow-up questions

    def ask(video, image, link, question, max_num_frames, dropping, messages, state):
        link = (link or "").strip()
        if not (link or video or image):
            raise gr.Error("Upload a video or an image, or paste a link")
        if not (question or "").strip():
            raise gr.Error("Ask a question")
        key = (link or video or image, int(max_num_frames))
        if state.get("key") != key:  # other media or frame count: a new conversation
            state, messages = {"key": key, "history": None}, []
        set_token_dropping(model, dropping)
        try:
            media = copies(link, False) if link else copies(video or image, True)
        except ValueError as error:  # a link that cannot be fetched: say why
            raise gr.Error(str(error)) from None
        messages = [*messages, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        for answer, history in streamed_chat(model, tokenizer, media, question, state["history"], int(max_num_frames)):
            state = state if history is None else {**state, "history": history}
            messages[-1] = {"role": "assistant", "content": answer}
            yield messages, state, ""

    with gr.Blocks(title="VideoChat-Flash", analytics_enabled=False) as demo:
        gr.Markdown("# VideoChat-Flash\nUpload or link a video (or an image) and ask about it. Follow-up questions "
                    "reuse the encoded video.")
        state = gr.State({})
        with gr.Row():
            with gr.Column(scale=1):
                video = gr.Video(label="Video", sources=["upload"])
                image = gr.Image(label="or an image", type="filepath", sources=["upload"])
                link = gr.Textbox(label="or a link (http(s) URL of a video or an image)")
                frames = gr.Slider(4, 1024, value=DEFAULT_FRAMES, step=4, label="Frames (max_num_frames)")
                dropping = gr.Checkbox(label="Token dropping (the model card's mm_llm_compress)")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Conversation", height=420)
                question = gr.Textbox(label="Question", placeholder="Describe this video in detail.")
                with gr.Row():
                    send = gr.Button("Ask", variant="primary")
                    clear = gr.Button("New conversation")
        inputs = [video, image, link, question, frames, dropping, chatbot, state]
        outputs = [chatbot, state, question]
        # one conversation at a time on the model (chat() keeps its caches there), from either trigger
        send.click(ask, inputs, outputs, api_name="ask", concurrency_limit=1, concurrency_id="model")
        question.submit(ask, inputs, outputs, api_name=False, concurrency_limit=1, concurrency_id="model")
        clear.click(lambda: ([], {}), None, [chatbot, state], api_name=False)
    return demo


if __name__ == "__main__":
    build_demo(*load_model()).launch()
