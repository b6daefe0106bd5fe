"""eSpeak NG speech synthesis through ctypes, with phoneme timings.

The shared library and its data come from the ``espeakng-loader`` pip package. eSpeak runs in synchronous mode:
``espeak_Synth`` calls our callback with 22.05 kHz 16-bit audio chunks and a list of events; phoneme events carry
the phoneme name and its start time (ms) in the utterance. The audio is resampled to 16 kHz
(``resample_poly(x, 320, 441)``) and every phoneme gets an end time (the next phoneme's start, or the end of speech).

eSpeak keeps global state, so ``ESpeak()`` is a per-process singleton guarded by a lock; a process created by
``fork`` initialises its own copy on first use. Usage::

    speech = ESpeak().synthesize("the cat sat on the mat", voice="en-us+f3", rate=160)
    speech.audio            # float32 [N] at 16 kHz
    speech.phonemes[0]      # PhonemeEvent(start_s=..., end_s=..., phoneme='D')
"""
from __future__ import annotations

import _ctypes
import ctypes
import importlib.util
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from math import gcd
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
from scipy.signal import resample_poly

SAMPLE_RATE = 16000

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INIT_PHONEME_EVENTS = 0x0001
_INIT_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_PHONEME = 7
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE = 1, 2, 3, 4
_EE_OK = 0


class ESpeakError(RuntimeError):
    """The eSpeak NG library could not be loaded or refused a request."""


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # ms from the start of the utterance
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


class _Voice(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass(frozen=True)
class PhonemeEvent:
    start_s: float
    end_s: float
    phoneme: str  # eSpeak's phoneme mnemonic ("D", "@", "k"); names starting with "_" are pauses


@dataclass
class Speech:
    audio: np.ndarray  # float32 [N], 16 kHz, in [-1, 1]
    sample_rate: int = SAMPLE_RATE
    phonemes: List[PhonemeEvent] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return len(self.audio) / self.sample_rate


def _package_dir() -> Path:
    spec = importlib.util.find_spec("espeakng_loader")
    if spec is None or not spec.submodule_search_locations:
        raise ESpeakError("the pip package 'espeakng-loader' (libespeak-ng and its data) is not installed")
    return Path(list(spec.submodule_search_locations)[0])


class ESpeak:
    """Process-wide eSpeak NG synthesiser. ``ESpeak()`` returns the same object within one process.

    eSpeak carries state from one utterance to the next (the pitch-flutter phase, the waveform phase), so the
    same text would come out a few samples different each time. To make every call a pure function of its
    arguments, each ``synthesize`` loads a private copy of the library, initialises it, speaks, and unloads it
    (about 5 ms). The private copy (one per library file, shared by the user's processes) guarantees no other
    code in the process holds the same library open, which would keep its state alive.
    """

    _instance: Optional["ESpeak"] = None
    _instance_pid: int = -1
    _create_lock = threading.Lock()

    def __new__(cls) -> "ESpeak":
        with cls._create_lock:
            if cls._instance is None or cls._instance_pid != os.getpid():
                obj = super().__new__(cls)
                obj._init()
                cls._instance, cls._instance_pid = obj, os.getpid()
            return cls._instance

    def _init(self) -> None:
        pkg = _package_dir()
        lib_path, data_path = pkg / "libespeak-ng.so", pkg / "espeak-ng-data"
        if not lib_path.exists() or not (data_path / "phontab").exists():
            raise ESpeakError(f"espeakng-loader at {pkg} lacks libespeak-ng.so or espeak-ng-data/phontab")
        self._lib_path = _private_copy(lib_path)
        self._data_path = data_path
        self._lock = threading.Lock()
        self._chunks: List[np.ndarray] = []
        self._events: List[tuple] = []
        self._callback = _SynthCallback(self._on_audio)  # keep a reference: the library holds a raw pointer
        self._libc_srand = ctypes.CDLL(None).srand  # the speechPlayer voices draw noise from libc rand()
        with self._lock, self._loaded() as lib:
            self.native_rate = self._native_rate
            self._voices = _read_voices(lib)
        self._variants = sorted(p.name for p in (data_path / "voices" / "!v").iterdir() if p.is_file())
        g = gcd(SAMPLE_RATE, self.native_rate)
        self._up, self._down = SAMPLE_RATE // g, self.native_rate // g  # 320, 441 for 22.05 kHz

    @contextmanager
    def _loaded(self) -> Iterator[ctypes.CDLL]:
        """A freshly loaded and initialised library, unloaded on exit (caller holds ``self._lock``)."""
        try:
            lib = ctypes.CDLL(str(self._lib_path), mode=os.RTLD_LOCAL)
        except OSError as e:
            raise ESpeakError(f"cannot load the eSpeak NG library {self._lib_path}: {e}") from e
        try:
            _declare(lib)
            rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self._data_path).encode(),
                                         _INIT_PHONEME_EVENTS | _INIT_DONT_EXIT)
            if rate <= 0:
                raise ESpeakError(f"espeak_Initialize failed (returned {rate}) with data at {self._data_path}")
            self._native_rate = int(rate)
            lib.espeak_SetSynthCallback(self._callback)
            yield lib
        finally:
            lib.espeak_Terminate()
            handle = lib._handle
            del lib
            _ctypes.dlclose(handle)

    def _on_audio(self, wav, num_samples, events) -> int:
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            ev = events[i]
            if ev.type == _EVENT_PHONEME:
                self._events.append((ev.audio_position, ev.id.string.decode("utf-8", "replace")))
            i += 1
        return 0  # 0 = continue synthesis

    def _voice_name(self, voice: str) -> str:
        base, plus, variant = voice.partition("+")
        name = self._voices.get(base.lower())
        if name is None:
            raise ESpeakError(f"unknown eSpeak voice {base!r} in {voice!r} (see mome.data.espeak.list_voices())")
        if plus and variant not in self._variants:
            raise ESpeakError(f"unknown eSpeak voice variant {variant!r} in {voice!r} (see list_variants())")
        return name + plus + variant

    def synthesize(self, text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50,
                   pitch_range: int = 50) -> Speech:
        """Speak ``text``. ``voice``: a name from ``list_voices`` with an optional ``+variant`` (``en-us+f3``);
        ``rate`` in words per minute (80-450); ``pitch`` and ``pitch_range`` in 0-100. Same arguments, same phonemes and length; the waveform is usually identical
        (about 1 call in 15 its noise component differs, ~7 % relative RMS: tests/test_espeak.py)."""
        if not text or not text.strip():
            raise ValueError("eSpeak cannot synthesize empty text")
        for name, value, hi in (("rate", rate, 450), ("pitch", pitch, 100), ("pitch_range", pitch_range, 100)):
            lo = 80 if name == "rate" else 0
            if not lo <= value <= hi:
                raise ValueError(f"eSpeak {name}={value} is outside [{lo}, {hi}]")
        voice_name = self._voice_name(voice)
        data = text.encode("utf-8") + b"\0"
        with self._lock:
            self._chunks, self._events = [], []
            try:
                with self._loaded() as lib:
                    if lib.espeak_SetVoiceByName(voice_name.encode()) != _EE_OK:
                        raise ESpeakError(f"eSpeak refused voice {voice!r}")
                    for param, value in ((_PARAM_RATE, rate), (_PARAM_VOLUME, 100), (_PARAM_PITCH, pitch),
                                         (_PARAM_RANGE, pitch_range)):
                        if lib.espeak_SetParameter(param, int(value), 0) != _EE_OK:
                            raise ESpeakError(f"eSpeak refused parameter {param}={value}")
                    self._libc_srand(0)
                    err = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
                    if err != _EE_OK:
                        raise ESpeakError(f"espeak_Synth failed with code {err} for text {text[:60]!r}")
                chunks, events = self._chunks, self._events
            finally:
                self._chunks, self._events = [], []
        native = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
        audio = resample_poly(native.astype(np.float32) / 32768.0, self._up, self._down).astype(np.float32)
        duration = len(audio) / SAMPLE_RATE
        return Speech(audio=np.clip(audio, -1.0, 1.0), phonemes=_phoneme_events(events, duration))

    def list_voices(self, language: Optional[str] = None) -> List[str]:
        """Voice names accepted by ``synthesize`` (eSpeak identifiers such as ``en-us``, ``en-gb-x-rp``; ``en`` is
        British English), optionally only those starting with ``language``. A variant can be appended:
        ``en-us+f3`` (see ``list_variants``)."""
        names = sorted(n for n, ident in self._voices.items() if n == ident.lower())
        if language:
            names = [n for n in names if n.startswith(language.lower())]
        return names

    def list_variants(self) -> List[str]:
        """Voice variant names (``m1`` ... ``m7``, ``f1`` ... ``f5``, ``klatt`` ...), usable as ``<voice>+<variant>``."""
        return list(self._variants)


def _declare(lib: ctypes.CDLL) -> None:
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p]
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
    lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
    lib.espeak_Terminate.argtypes = []
    lib.espeak_Terminate.restype = ctypes.c_int


def _read_voices(lib: ctypes.CDLL) -> Dict[str, str]:
    """lowercase name -> the name eSpeak accepts. Names are the voice files' base names (``gmw/en-US`` ->
    ``en-us``); each voice's main language code (``en-gb`` for ``gmw/en``) is an alias when not itself a name."""
    voices: Dict[str, str] = {}
    aliases: Dict[str, str] = {}
    arr = lib.espeak_ListVoices(None)
    i = 0
    while arr[i]:
        v = arr[i].contents
        ident = (v.identifier or b"").decode().rsplit("/", 1)[-1]
        voices[ident.lower()] = ident
        lang = (v.languages or b"")[1:].decode(errors="replace").lower()  # first byte is the priority
        if lang:
            aliases.setdefault(lang, ident)
        i += 1
    for lang, ident in aliases.items():
        voices.setdefault(lang, ident)
    return voices


def _private_copy(lib_path: Path) -> Path:
    """A copy of the library that no other code opens, so unloading it really discards eSpeak's state."""
    st = lib_path.stat()
    folder = Path(tempfile.gettempdir()) / f"mome-espeak-{os.getuid()}-{st.st_size}-{int(st.st_mtime)}"
    target = folder / lib_path.name
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{lib_path.name}.{os.getpid()}.tmp"
        shutil.copyfile(lib_path, tmp)
        os.replace(tmp, target)  # atomic: concurrent processes never see a partial file
    return target


def _phoneme_events(events: List[tuple], duration_s: float) -> List[PhonemeEvent]:
    """Phoneme events with end times (the next event's start, or the end of the audio). Events with an empty name
    only close the previous phoneme; zero-length events (a pause at the same ms as the next sound) are dropped, so
    start times strictly increase."""
    out: List[PhonemeEvent] = []
    starts = [min(max(ms / 1000.0, 0.0), duration_s) for ms, _ in events]
    for k, (start, (_, name)) in enumerate(zip(starts, events)):
        end = starts[k + 1] if k + 1 < len(starts) else duration_s
        if name.strip() and end > start:
            out.append(PhonemeEvent(start_s=start, end_s=end, phoneme=name))
    return out


def list_voices(language: Optional[str] = None) -> List[str]:
    """Voice names eSpeak NG knows (see ``ESpeak.list_voices``)."""
    return ESpeak().list_voices(language)


def list_variants() -> List[str]:
    return ESpeak().list_variants()


def synthesize(text: str, **kwargs) -> Speech:
    """``ESpeak().synthesize(text, **kwargs)``."""
    return ESpeak().synthesize(text, **kwargs)
