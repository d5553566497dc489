"""Video: frame sampling with decord / PyAV, clear errors, per-frame reduction on LLaVA, Qwen2-VL's own video path."""

from __future__ import annotations

import copy
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_aim import reference_merge

import vlmeff
from conftest import llm_input_lengths, make_image
from vlmeff.connectors.qwen2_vl import video_patches
from vlmeff.pruners.pre_llm.aim import AIM
from vlmeff.spec import parse_spec
from vlmeff.strategy import NotApplicableError
from vlmeff.video import VideoError, load_video, read_video

av = pytest.importorskip("av")
try:
    import decord  # noqa: F401

    HAS_DECORD = True
except ImportError:
    HAS_DECORD = False

BACKENDS = [pytest.param("decord", marks=pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")), "pyav"]
CODEC = next(c for c in ("libx264", "mpeg4") if c in av.codecs_available)
NUM, RATE, WIDTH, HEIGHT = 12, 6, 64, 48


def level(i: int) -> int:
    """Grey level of frame i of the test video (solid frames, far apart so a decoded frame tells its index)."""
    return 10 + 20 * i


def write_video(path, num=NUM, rate=RATE, codec=CODEC, size=(WIDTH, HEIGHT), frames=None):
    """Write `num` solid grey frames (or the given uint8 [H, W, 3] arrays) with PyAV."""
    container = av.open(str(path), "w")
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    if frames is None:
        frames = [np.full((size[1], size[0], 3), level(i), np.uint8) for i in range(num)]
    if not frames:
        container.start_encoding()  # write the header even without a frame
    for array in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "grey.mp4")


def frame_of(image: Image.Image) -> int:
    """Index of the solid test frame an image shows (from its mean grey level)."""
    mean = float(np.asarray(image, dtype=np.float64).mean())
    return int(round((mean - 10) / 20))


# --- sampling -----------------------------------------------------------------------------------------------------
def expected_uniform(first, stop, n):
    m = stop - first
    if n is None or n >= m:
        return list(range(first, stop))
    return [first + int((j + 0.5) * m / n) for j in range(n)]


def expected_fps(native, fps, first, stop, cap):
    picked, k = [], 0
    while first / native + k / fps < stop / native - 1e-9:
        index = int(math.floor((first / native + k / fps) * native + 1e-6))
        if index not in picked:
            picked.append(index)
        k += 1
    if cap is None or cap >= len(picked):
        return picked
    return [picked[int((j + 0.5) * len(picked) / cap)] for j in range(cap)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_frames", [1, 4, 5, 12, 20, None])
def test_uniform_sampling(video, backend, num_frames):
    clip = read_video(video, num_frames=num_frames, backend=backend)
    expected = expected_uniform(0, NUM, num_frames)
    assert clip.backend == backend and clip.total_frames == NUM and clip.fps == pytest.approx(RATE)
    assert clip.indices == expected
    assert clip.timestamps == pytest.approx([i / RATE for i in expected])
    assert [frame_of(f) for f in clip.frames] == expected  # the pixels are those of the sampled frames
    assert all(f.mode == "RGB" and f.size == (WIDTH, HEIGHT) for f in clip.frames)
    assert len(load_video(video, num_frames=num_frames, backend=backend)) == len(expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("fps", "start", "end", "cap"), [
    (2, None, None, None), (2, None, None, 3), (4, 0.5, 1.5, None), (4, 0.5, 1.5, 3), (100, None, None, None),
    (1, 0.4, None, 8), (3, None, 1.0, 8),
])
def test_fps_sampling(video, backend, fps, start, end, cap):
    clip = read_video(video, num_frames=cap, sampling="fps", fps=fps, start=start, end=end, backend=backend)
    first = 0 if start is None else math.ceil(start * RATE - 1e-9)
    stop = NUM if end is None else math.ceil(end * RATE - 1e-9)
    expected = expected_fps(RATE, fps, first, stop, cap)
    assert clip.indices == expected
    assert [frame_of(f) for f in clip.frames] == expected


def test_known_values(video):
    """Hand-computed cases (not derived from the rule's own formula)."""
    assert read_video(video, 4, backend="pyav").indices == [1, 4, 7, 10]
    assert read_video(video, None, sampling="fps", fps=2, backend="pyav").indices == [0, 3, 6, 9]
    assert read_video(video, 3, sampling="fps", fps=4, start=0.5, end=1.5, backend="pyav").indices == [3, 6, 7]
    assert read_video(video, 2, start=1.0, backend="pyav").indices == [7, 10]  # frames 6..11, two segments


@pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")
def test_backends_agree(tmp_path):
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8) for _ in range(NUM)]
    path = write_video(tmp_path / "noise.mp4", frames=noise)
    a = read_video(path, 5, backend="decord")
    b = read_video(path, 5, backend="pyav")
    assert a.indices == b.indices
    for x, y in zip(a.frames, b.frames):
        diff = np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16))
        assert diff.mean() < 3  # same decoded frame; the two colour conversions differ by a few levels


def test_auto_falls_back_to_pyav_without_decord(video, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # import decord -> ImportError (as on aarch64)
    clip = read_video(video, 4)
    assert clip.backend == "pyav" and clip.indices == [1, 4, 7, 10]
    with pytest.raises(VideoError, match="decord is not installed"):
        read_video(video, 4, backend="decord")


@pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")
def test_auto_prefers_decord(video):
    assert read_video(video, 4).backend == "decord"


# --- errors -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_missing_corrupt_and_empty_videos(tmp_path, backend):
    with pytest.raises(VideoError, match=r"'.*nope\.mp4' does not exist"):
        load_video(tmp_path / "nope.mp4", backend=backend)
    corrupt = tmp_path / "random.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match=r"'.*random\.mp4' could not be decoded"):
        load_video(corrupt, backend=backend)
    no_stream = write_video(tmp_path / "empty.mp4", num=0)  # the mp4 muxer drops an empty track
    with pytest.raises(VideoError, match=r"'.*empty\.mp4' has no video stream"):
        load_video(no_stream, backend=backend)
    zero = write_video(tmp_path / "empty.avi", num=0, codec="mpeg4")  # a video stream with zero frames
    if backend == "decord":  # decord itself fails on it (filter graph error)
        with pytest.raises(VideoError, match=r"'.*empty\.avi' could not be decoded by decord"):
            load_video(zero, backend=backend)
    else:
        assert len(av.open(str(zero)).streams.video) == 1
        with pytest.raises(VideoError, match=r"'.*empty\.avi' has no frames"):
            load_video(zero, backend=backend)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_frames": 0}, "num_frames=0: expected an integer >= 1"),
    ({"num_frames": -3}, "num_frames=-3"),
    ({"num_frames": 2.5}, "num_frames=2.5"),
    ({"sampling": "random"}, "sampling='random': expected one of 'uniform', 'fps'"),
    ({"sampling": "fps"}, "fps=None: sampling='fps' needs a frame rate > 0"),
    ({"sampling": "fps", "fps": 0}, "fps=0: sampling='fps' needs a frame rate > 0"),
    ({"sampling": "fps", "fps": -1.5}, "fps=-1.5"),
    ({"fps": 2}, "fps=2: only used with sampling='fps'"),
    ({"start": 1.0, "end": 1.0}, r"start=1.0, end=1.0: start must be before end"),
    ({"start": 1.5, "end": 0.5}, "start=1.5, end=0.5"),
    ({"start": -1}, r"start=-1: expected a time in seconds >= 0"),
    ({"backend": "ffmpeg"}, "backend='ffmpeg': expected one of 'auto', 'decord', 'pyav'"),
])
def test_bad_arguments(video, kwargs, message):
    with pytest.raises(VideoError, match=message):
        load_video(video, **kwargs)


def test_range_without_frames(video):
    with pytest.raises(VideoError, match=r"grey\.mp4.*no frames between start=5"):
        load_video(video, start=5, backend="pyav")
    assert issubclass(VideoError, ValueError)


# --- LLaVA: a video as one image per frame -------------------------------------------------------------------------
def frame_images(n=4, seed=0, size=(60, 50)):
    return [make_image(seed + i, size) for i in range(n)]


def video_prompt(processor, n, text="What is in the image?"):
    content = [{"type": "image"} for _ in range(n)] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def llava_video_inputs(processor, frames):
    return processor(images=frames, text=video_prompt(processor, len(frames)), return_tensors="pt")


@pytest.mark.parametrize(("spec", "budget"), [
    ("fastervlm:keep=8", 8), ("random:keep=8", 8), ("visionzip:keep=8", 8), ("pool:keep=16", 16),
    ("random:ratio=0.25", 16),
])
def test_llava_reduces_each_frame_to_the_budget(loaded, spec, budget):
    model, processor = loaded("llava-clip")
    frames = frame_images(4)
    inputs = llava_video_inputs(processor, frames)
    vm = vlmeff.wrap(model, processor, spec)
    seen, handle = llm_input_lengths(model)
    try:
        out = vm.generate(**inputs, frames=[0, 1, 2, 3], max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    records = vm.last_record
    num_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum()) // 4
    assert num_tokens == 64 and len(records) == 4
    assert [r.frame for r in records] == [0, 1, 2, 3] and [r.image for r in records] == [0, 1, 2, 3]
    assert [r.num_kept for r in records] == [budget] * 4
    assert [r.to_dict()["frame"] for r in records] == [0, 1, 2, 3]
    assert seen[0] == inputs["input_ids"].shape[1] - 4 * num_tokens + 4 * budget  # the LLM sees the reduced video
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    # per frame = the same strategy on that frame alone as a still image (fastervlm / visionzip / pool are
    # per-image rules; random's seed depends on the image's position in its sample, so skip it here)
    if not spec.startswith("random"):
        for i, frame in enumerate(frames):
            vm.prepare(**llava_video_inputs(processor, [frame]))
            assert vm.last_record[0].frame is None
            assert vm.last_record[0].kept_indices.tolist() == records[i].kept_indices.tolist(), f"frame {i}"
    vm.unwrap()


def _llava_features(model, pixel_values):
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    last = model.config.vision_config.num_hidden_layers - 1
    layer = model.model.vision_tower.encoder.layers[last]  # CLIP
    with torch.no_grad():
        keys = layer.self_attn.k_proj(layer.layer_norm1(hidden[last]))[:, 1:]  # last-block keys, [CLS] dropped
    return hidden[model.config.vision_feature_layer][:, 1:], keys


def test_aim_uses_video_defaults_on_frames(loaded):
    model, processor = loaded("llava-clip")
    frames = frame_images(3, seed=20)
    inputs = llava_video_inputs(processor, frames)
    features, keys = _llava_features(model, inputs["pixel_values"])  # [3, 64, D], [3, 64, D_k]
    num = features.shape[1]
    with vlmeff.wrap(model, processor, "aim") as vm:
        vm.prepare(**inputs, frames=[0, 1, 2])
        as_frames = vm.last_record
        vm.prepare(**inputs)  # the same images as still images
        as_images = vm.last_record
    for i in range(3):
        assert as_frames[i].num_kept == num // 4 and as_images[i].num_kept == num // 8
        # frames: 2 iterations on the features themselves; images: 3 iterations on the last-block keys
        assert as_frames[i].merge_groups == reference_merge(features[i], None, iterations=2)[2]
        assert as_images[i].merge_groups == reference_merge(features[i], keys[i], iterations=3)[2]
        assert reference_merge(features[i], keys[i], iterations=2)[2] != as_frames[i].merge_groups
    # values the user gave win on frames too
    with vlmeff.wrap(model, processor, "aim:iterations=3") as vm:
        vm.prepare(**inputs, frames=[0, 1, 2])
        assert [r.num_kept for r in vm.last_record] == [num // 8] * 3
        assert vm.last_record[0].merge_groups == reference_merge(features[0], None, iterations=3)[2]
    with vlmeff.wrap(model, processor, "aim:metric=keys") as vm:
        vm.prepare(**inputs, frames=[0, 1, 2])
        assert vm.last_record[1].merge_groups == reference_merge(features[1], keys[1], iterations=2)[2]
    with vlmeff.wrap(model, processor, "aim:keep=10") as vm:  # a budget: exact count, features metric on frames
        vm.prepare(**inputs, frames=[0, 1, 2])
        assert [r.num_kept for r in vm.last_record] == [10] * 3
        assert vm.last_record[2].merge_groups == reference_merge(features[2], None, keep=10)[2]


def test_aim_auto_spec_round_trips():
    auto = AIM()
    assert (auto.iterations, auto.metric) == (3, "keys")  # the image values, as before
    assert parse_spec(auto.spec())[0] == auto and parse_spec("aim")[0] == auto
    assert "iterations" not in auto.spec() and "metric" not in auto.spec()
    explicit = parse_spec("aim:iterations=3,metric=keys")[0]
    assert explicit != auto and parse_spec(explicit.spec())[0] == explicit
    assert "iterations=3" in explicit.spec() and "metric=keys" in explicit.spec()


def test_chat_video_generates_and_keep_everything_equals_the_model(loaded, video):
    model, processor = loaded("llava-clip")
    frames = load_video(video, num_frames=4)
    inputs = llava_video_inputs(processor, frames)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    ref_text = processor.decode(ref[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    for spec in ("vanilla", "fastervlm:keep=1000", "aim:keep=1000"):
        with vlmeff.wrap(model, processor, spec) as vm:
            out = vm.generate(**inputs, frames=range(4), max_new_tokens=6, do_sample=False)
            assert torch.equal(out, ref), spec
            assert vm.chat_video(video, "What is in the image?", num_frames=4, max_new_tokens=6) == ref_text
            assert [r.frame for r in vm.last_record] == [0, 1, 2, 3]
    with vlmeff.wrap(model, processor, "fastervlm:keep=4") as vm:
        answer = vm.chat_video(video, "What is in the image?", num_frames=3, sampling="fps", fps=1,
                               max_new_tokens=4)
        assert isinstance(answer, str)
        assert [r.num_kept for r in vm.last_record] == [4, 4] and vm.stats.visual_tokens_kept == 8  # 2 s at 1 fps
        assert isinstance(vm.chat_video(frames[:2], "What is in the image?", max_new_tokens=2), str)  # frames given
        assert [r.frame for r in vm.last_record] == [0, 1]


def test_frames_argument_is_validated(loaded):
    model, processor = loaded("llava-clip")
    inputs = llava_video_inputs(processor, frame_images(2))
    with vlmeff.wrap(model, processor, "random:keep=4") as vm:
        with pytest.raises(ValueError, match=r"frames=\[0\]: expected one entry per image \(2 here\)"):
            vm.prepare(**inputs, frames=[0])
        with pytest.raises(ValueError, match=r"frames=\[0, -1\]"):
            vm.prepare(**inputs, frames=[0, -1])
        vm.prepare(**inputs, frames=[None, 5])  # a still image and frame 5 of some video
        assert [r.frame for r in vm.last_record] == [None, 5]


# --- Qwen2-VL: its own video path --------------------------------------------------------------------------------
QWEN_VIDEO_TEMPLATE_ITEM = "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"


def qwen_patchify(frames: list[Image.Image], processor) -> torch.Tensor:
    """Qwen2-VL's video patch layout written out with loops, from 168x168 frames (no resize needed)."""
    ip = processor.image_processor
    arrays = [(np.asarray(f, np.float64) / 255.0 - np.array(ip.image_mean)) / np.array(ip.image_std) for f in frames]
    if len(arrays) % 2:
        arrays.append(arrays[-1])
    p, m = 14, 2
    h, w = arrays[0].shape[0] // p, arrays[0].shape[1] // p
    rows = []
    for g in range(len(arrays) // 2):
        for bh in range(h // m):
            for bw in range(w // m):
                for mh in range(m):
                    for mw in range(m):
                        y, x = (bh * m + mh) * p, (bw * m + mw) * p
                        rows.append(np.stack([np.stack([arrays[2 * g + j][y:y + p, x:x + p, c] for j in range(2)])
                                              for c in range(3)]).reshape(-1))  # [c, j, y, x]
    return torch.tensor(np.stack(rows), dtype=torch.float32)


@pytest.mark.parametrize("num", [4, 3])
def test_qwen_video_patches_layout(loaded, num):
    _, processor = loaded("qwen2-vl")
    frames = frame_images(num, seed=40, size=(168, 168))
    pixel_values_videos, grid = video_patches(processor.image_processor, frames)
    assert grid.tolist() == [[math.ceil(num / 2), 12, 12]]
    torch.testing.assert_close(pixel_values_videos, qwen_patchify(frames, processor), rtol=0, atol=1e-5)


def qwen_inputs(model, processor, frames, image=None, text="Describe the picture."):
    """Qwen2-VL inputs built by hand: optional image, then one video, then the text (placeholders expanded)."""
    ip, tok = processor.image_processor, processor.tokenizer
    pixel_values_videos, video_grid = video_patches(ip, frames)
    parts, extra = ["<|im_start|>user\n"], {}
    if image is not None:
        out = ip(images=[image], return_tensors="pt")
        extra = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
        parts.append("<|vision_start|>" + "<|image_pad|>" * (int(out["image_grid_thw"].prod()) // 4) + "<|vision_end|>")
    parts.append("<|vision_start|>" + "<|video_pad|>" * (int(video_grid.prod()) // 4) + "<|vision_end|>")
    parts.append(f"{text}<|im_end|>\n<|im_start|>assistant\n")
    encoded = tok("".join(parts), return_tensors="pt")
    ids = encoded["input_ids"]
    types = (ids == model.config.image_token_id).long() + 2 * (ids == model.config.video_token_id).long()
    return {"input_ids": ids, "attention_mask": encoded["attention_mask"], "mm_token_type_ids": types,
            "pixel_values_videos": pixel_values_videos, "video_grid_thw": video_grid, **extra}


@pytest.mark.parametrize("kind", ["qwen2-vl", "qwen2.5-vl"])
@pytest.mark.parametrize("with_image", [False, True])
def test_qwen_video_keep_everything_equals_the_model(loaded, kind, with_image):
    model, processor = loaded(kind)
    frames = frame_images(4, seed=50, size=(168, 168))
    inputs = qwen_inputs(model, processor, frames, make_image(9, (168, 168)) if with_image else None)
    with torch.no_grad():
        ref_logits = model(**inputs).logits
        ref = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    for spec in ("vanilla", "random:keep=1000"):
        with vlmeff.wrap(model, processor, spec) as vm:
            assert torch.equal(vm(**inputs).logits, ref_logits), spec
            assert torch.equal(vm.generate(**inputs, max_new_tokens=5, do_sample=False), ref), spec
            records = vm.last_record
    expected = ([None] if with_image else []) + [0, 1]
    assert [r.frame for r in records] == expected
    assert [r.num_tokens for r in records] == [36] * len(expected)


@pytest.mark.parametrize("kind", ["qwen2-vl", "qwen2.5-vl"])
def test_qwen_video_prunes_per_frame_with_original_mrope_ids(loaded, kind):
    model, processor = loaded(kind)
    frames = frame_images(6, seed=60, size=(168, 168))  # 3 temporal patches of 6 x 6 merged tokens
    inputs = qwen_inputs(model, processor, frames)
    ids = inputs["input_ids"][0]
    video = (ids == model.config.video_token_id).nonzero()[:, 0]
    start = int(video[0])  # text positions 0..start-1 precede the video
    vm = vlmeff.wrap(model, processor, "random:keep=5")
    kw = vm.prepare(**inputs)
    records = vm.last_record
    assert [r.frame for r in records] == [0, 1, 2] and [r.grid for r in records] == [(1, 6, 6)] * 3
    assert [r.num_kept for r in records] == [5] * 3
    kept_ids = kw["input_ids"][0]
    assert int((kept_ids == model.config.video_token_id).sum()) == 15
    # M-RoPE ids of the kept video tokens: (start + f, start + row, start + col) of their cells (Qwen2-VL: one
    # temporal id per temporal patch; Qwen2.5-VL: f * tokens_per_second * 1 s per grid)
    step = model.config.vision_config.tokens_per_second if kind == "qwen2.5-vl" else 1
    positions = kw["position_ids"][1:, 0]  # [3, S'] (t, h, w)
    where = (kept_ids == model.config.video_token_id).nonzero()[:, 0]
    expected = []
    for r in records:
        for cell in r.kept_indices.tolist():
            expected.append([start + r.frame * step, start + cell // 6, start + cell % 6])
    assert positions[:, where].T.tolist() == expected
    # text after the video continues at the ORIGINAL ids (start + max(6, 6) + ...)
    with torch.no_grad():
        full, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                             video_grid_thw=inputs["video_grid_thw"])
    assert positions[:, -1].tolist() == full[:, 0, -1].tolist()
    seen, handle = llm_input_lengths(model)
    try:
        out = vm.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
        vm.unwrap()
    assert seen[0] == ids.numel() - 3 * 36 + 15 and out.shape[1] == ids.numel() + 3


def test_qwen_video_aim_defaults_and_strategies(loaded):
    model, processor = loaded("qwen2-vl")
    frames = frame_images(4, seed=70, size=(168, 168))
    inputs = qwen_inputs(model, processor, frames, make_image(3, (168, 168)))
    with torch.no_grad():
        video_tokens = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                                      return_dict=True).pooler_output[0]  # [2 * 36, D]
    with vlmeff.wrap(model, processor, "aim:metric=features") as vm:  # explicit metric (the image needs it)
        vm.prepare(**inputs)
        records = vm.last_record
    # image: 3 iterations (36 -> 18 -> 9 -> 5); frames: 2 iterations (36 -> 18 -> 9) on the merged tokens
    assert [r.frame for r in records] == [None, 0, 1] and [r.num_kept for r in records] == [5, 9, 9]
    for f in range(2):
        assert records[1 + f].merge_groups == reference_merge(video_tokens[36 * f:36 * (f + 1)], None,
                                                              iterations=2)[2]
    with vlmeff.wrap(model, processor, "aim") as vm:  # auto: the frames need no keys, the still image does
        with pytest.raises(NotApplicableError, match="metric=features"):
            vm.prepare(**inputs)
        video_only = qwen_inputs(model, processor, frames)
        vm.prepare(**video_only)
        assert [r.num_kept for r in vm.last_record] == [9, 9]
    with vlmeff.wrap(model, processor, "fastervlm:keep=6,scorer=global_query") as vm:
        out = vm.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert [r.num_kept for r in vm.last_record] == [6, 6, 6] and out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_qwen_chat_video_and_refusals(loaded, video):
    model, processor = loaded("qwen2-vl")
    proc = copy.copy(processor)
    proc.chat_template = processor.chat_template.replace("{% elif item['type'] == 'text' %}",
                                                         QWEN_VIDEO_TEMPLATE_ITEM + "{% elif item['type'] == 'text' %}")
    with vlmeff.wrap(model, proc, "pool:keep=9") as vm:
        answer = vm.chat_video(video, "Describe the picture.", num_frames=4, max_new_tokens=3)
        assert isinstance(answer, str)
        assert [r.frame for r in vm.last_record] == [0, 1] and all(r.num_kept <= 9 for r in vm.last_record)
        # the same inputs built by hand (frames resized by the processor to 12 x 14 patches -> 6 x 7 tokens)
        assert vm.last_record[0].grid == (1, 6, 7)
    with vlmeff.wrap(model, processor, "vanilla") as vm:  # the tiny template has no video entry
        with pytest.raises(ValueError, match=r"exactly one <\|video_pad\|>.*no video entry"):
            vm.chat_video(video, "Describe the picture.", num_frames=2)
    inputs = qwen_inputs(model, processor, frame_images(2, size=(168, 168)))
    with vlmeff.wrap(model, processor, "flowcut:keep=4") as vm:
        with pytest.raises(NotApplicableError, match="not implemented for video"):
            vm.prepare(**inputs)
    with vlmeff.wrap(model, processor, "fastv:keep=10,layer=1") as vm:
        with pytest.raises(NotApplicableError, match="in-LLM removal does not handle qwen2-vl video tokens"):
            vm.generate(**inputs, max_new_tokens=1)
