"""Video loading: sample frames from a video file with decord (PyAV as the fallback), with clear errors.

`load_video(path, num_frames=8)` returns the sampled frames as RGB PIL images; `read_video` returns them with their
frame indices and timestamps (`VideoFrames`).

Sampling (over the frames whose timestamp lies in [start, end), default the whole video):
- ``sampling="uniform"``: `num_frames` frames spread evenly: the range's m frames are cut into `num_frames` equal
  segments and the frame at the middle of each is taken (index floor((j + 0.5) m / num_frames), j = 0..n-1). When
  the range holds no more than `num_frames` frames (or `num_frames=None`), every frame of the range is returned.
- ``sampling="fps"``: one frame every 1 / `fps` seconds from the range start: the frame on screen at each tick
  (index floor(t * native_fps)), duplicates dropped (ticks faster than the video's own rate). If more than
  `num_frames` frames result, `num_frames` of them are taken with the uniform rule above; `num_frames=None` = no cap.

Timestamps assume a constant frame rate: frame i is at i / native_fps seconds (the container's average frame rate),
the same for both backends.

Backends: ``backend="auto"`` (default) tries decord first and PyAV when decord is not installed (decord has no
aarch64 wheels) or cannot open the file; "decord" and "pyav" force one. Both return identical indices; pixel values
can differ by the decoders' colour conversion (a few levels).

Errors raise `VideoError` (a ValueError) naming the file and the cause: missing file, a file that no backend can
decode (e.g. random bytes saved as .mp4), a file without a video stream, a video with zero frames, a time range
without frames; bad sampling arguments name the argument, the value and what is accepted.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlmeff.images import normalize_image

SAMPLINGS = ("uniform", "fps")
BACKENDS = ("auto", "decord", "pyav")


class VideoError(ValueError):
    """A video that cannot be used or bad sampling arguments, with the file and the reason."""


class _DecodeFailure(VideoError):
    """decord could not open or decode the file (backend="auto" then tries PyAV, whose diagnosis is more precise)."""


@dataclass
class VideoFrames:
    """Frames sampled from one video, in time order."""

    frames: list[Image.Image]  # RGB
    indices: list[int]  # frame index of each sampled frame in the video (ascending)
    timestamps: list[float]  # seconds: index / fps
    fps: float  # the video's average frame rate
    total_frames: int  # frames in the whole video
    backend: str  # "decord" or "pyav"
    path: str

    def __len__(self) -> int:
        return len(self.frames)


def load_video(path: str | os.PathLike, num_frames: int | None = 8, sampling: str = "uniform",
               fps: float | None = None, start: float | None = None, end: float | None = None,
               backend: str = "auto") -> list[Image.Image]:
    """Sample frames of a video file as RGB PIL images (see the module docstring for the sampling rules)."""
    return read_video(path, num_frames, sampling, fps, start, end, backend).frames


def read_video(path: str | os.PathLike, num_frames: int | None = 8, sampling: str = "uniform",
               fps: float | None = None, start: float | None = None, end: float | None = None,
               backend: str = "auto") -> VideoFrames:
    """Like `load_video`, returning the frames with their indices and timestamps (`VideoFrames`)."""
    check_sampling(num_frames, sampling, fps, start, end)
    if backend not in BACKENDS:
        raise VideoError(f"backend={backend!r}: expected one of {', '.join(map(repr, BACKENDS))}")
    name = str(path)
    if not Path(path).is_file():
        raise VideoError(f"video file {name!r} does not exist")
    if backend == "pyav":
        return _read_pyav(name, num_frames, sampling, fps, start, end)
    if backend == "decord":
        return _read_decord(name, num_frames, sampling, fps, start, end)
    try:
        import decord  # noqa: F401
    except ImportError:
        return _read_pyav(name, num_frames, sampling, fps, start, end)
    try:
        return _read_decord(name, num_frames, sampling, fps, start, end)
    except _DecodeFailure:
        if not _has_pyav():
            raise
        return _read_pyav(name, num_frames, sampling, fps, start, end)  # its errors are the more precise ones


def check_sampling(num_frames: int | None, sampling: str, fps: float | None, start: float | None,
                   end: float | None) -> None:
    """Validate the sampling arguments; raise `VideoError` naming the argument, its value and what is accepted."""
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1):
        raise VideoError(f"num_frames={num_frames!r}: expected an integer >= 1 (or None for every sampled frame)")
    if sampling not in SAMPLINGS:
        raise VideoError(f"sampling={sampling!r}: expected one of {', '.join(map(repr, SAMPLINGS))}")
    if sampling == "fps":
        if fps is None or isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0 \
                or not math.isfinite(fps):
            raise VideoError(f"fps={fps!r}: sampling='fps' needs a frame rate > 0 (frames per second of video time)")
    elif fps is not None:
        raise VideoError(f"fps={fps!r}: only used with sampling='fps' (got sampling={sampling!r}); drop fps or "
                         "set sampling='fps'")
    for arg, value in (("start", start), ("end", end)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise VideoError(f"{arg}={value!r}: expected a time in seconds >= 0 (or None)")
    if start is not None and end is not None and start >= end:
        raise VideoError(f"start={start!r}, end={end!r}: start must be before end (seconds, end exclusive)")


def sample_indices(total: int, native_fps: float, num_frames: int | None, sampling: str, fps: float | None,
                   start: float | None, end: float | None) -> np.ndarray:
    """Indices [n] (ascending int64) of the frames to take from a video of `total` frames at `native_fps`.

    Raises `ValueError` (the caller adds the file name) when the time range holds no frame.
    """
    first = 0 if start is None else math.ceil(start * native_fps - 1e-9)  # first frame with i / fps >= start
    stop = total if end is None else min(total, math.ceil(end * native_fps - 1e-9))  # frames with i / fps < end
    if first >= stop:
        duration = total / native_fps
        raise ValueError(f"no frames between start={start!r} and end={end!r} s (the video has {total} frames, "
                         f"{duration:.3f} s at {native_fps:g} fps)")
    if sampling == "uniform":
        candidates = np.arange(first, stop, dtype=np.int64)  # [m]
    else:
        t0 = first / native_fps
        t1 = stop / native_fps
        ticks = t0 + np.arange(math.ceil((t1 - t0) * fps - 1e-9)) / fps  # [n_ticks] seconds, t0 <= t < t1
        candidates = np.unique(np.clip(np.floor(ticks * native_fps + 1e-6).astype(np.int64), first, stop - 1))
    m = candidates.size
    if num_frames is None or num_frames >= m:
        return candidates
    picks = np.floor((np.arange(num_frames) + 0.5) * m / num_frames).astype(np.int64)  # segment midpoints
    return candidates[picks]


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def _result(name, frames, indices, native_fps, total, backend) -> VideoFrames:
    frames = [normalize_image(f, f"{name} frame {i}") for f, i in zip(frames, indices)]
    return VideoFrames(frames=frames, indices=[int(i) for i in indices],
                       timestamps=[float(i) / native_fps for i in indices], fps=float(native_fps),
                       total_frames=int(total), backend=backend, path=name)


def _pick(name, total, native_fps, num_frames, sampling, fps, start, end) -> np.ndarray:
    if total <= 0:
        raise VideoError(f"video file {name!r} has no frames (its video stream is empty)")
    if not native_fps or not math.isfinite(native_fps) or native_fps <= 0:
        raise VideoError(f"video file {name!r} has no usable frame rate ({native_fps!r}); cannot place frames in time")
    try:
        return sample_indices(total, native_fps, num_frames, sampling, fps, start, end)
    except ValueError as e:
        raise VideoError(f"video file {name!r}: {e}") from None


def _read_decord(name, num_frames, sampling, fps, start, end) -> VideoFrames:
    try:
        import decord
    except ImportError:
        raise VideoError("backend='decord': decord is not installed (no aarch64 wheels); install the 'video' extra "
                         "on x86_64, or use backend='pyav'") from None
    try:
        reader = decord.VideoReader(name, ctx=decord.cpu(0))
    except Exception as e:  # decord raises RuntimeError / DECORDError with a C++ log line
        cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        if "cannot find video stream" in str(e):
            raise _DecodeFailure(f"video file {name!r} has no video stream (decord: {cause})") from None
        raise _DecodeFailure(f"video file {name!r} could not be decoded by decord ({type(e).__name__}: {cause})") \
            from None
    total, native_fps = len(reader), float(reader.get_avg_fps())
    indices = _pick(name, total, native_fps, num_frames, sampling, fps, start, end)
    try:
        batch = reader.get_batch(indices.tolist()).asnumpy()  # [n, H, W, 3] uint8 RGB
    except Exception as e:
        raise _DecodeFailure(f"video file {name!r}: decord could not decode frames {indices.tolist()} "
                         f"({type(e).__name__}: {e})") from None
    return _result(name, [Image.fromarray(f) for f in batch], indices, native_fps, total, "decord")


def _read_pyav(name, num_frames, sampling, fps, start, end) -> VideoFrames:
    try:
        import av
    except ImportError:
        raise VideoError("reading videos needs decord or PyAV: pip install -c constraints-cpu.txt -e '.[video]'") \
            from None
    try:
        container = av.open(name)
    except (av.FFmpegError, OSError, EOFError) as e:
        raise VideoError(f"video file {name!r} could not be decoded by PyAV ({type(e).__name__}: {e})") from None
    with container:
        if not container.streams.video:
            raise VideoError(f"video file {name!r} has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        native_fps = float(rate) if rate else 0.0
        total = int(stream.frames or 0)
        try:
            if total <= 0:  # the header does not say: count the packets (no decoding)
                total = sum(1 for packet in container.demux(stream) if packet.size)
                _pick(name, total, native_fps, num_frames, sampling, fps, start, end)  # no frames: say so now
                container.seek(0)
            for _attempt in range(2):  # a second pass only if fewer frames decode than the header promised
                indices = _pick(name, total, native_fps, num_frames, sampling, fps, start, end)
                wanted = set(indices.tolist())
                frames: dict[int, Image.Image] = {}
                decoded = 0
                for frame in container.decode(stream):
                    if decoded in wanted:
                        frames[decoded] = frame.to_image()  # RGB PIL image (libswscale conversion)
                    decoded += 1
                    if decoded > indices[-1]:
                        break
                if len(frames) == len(wanted):
                    break
                total = decoded
                container.seek(0)
            else:
                raise VideoError(f"video file {name!r}: the stream ended after {decoded} decodable frames")
        except av.FFmpegError as e:
            raise VideoError(f"video file {name!r} could not be decoded by PyAV ({type(e).__name__}: {e})") from None
    return _result(name, [frames[i] for i in indices.tolist()], indices, native_fps, total, "pyav")
