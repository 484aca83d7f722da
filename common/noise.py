"""The one list of programming-noise models hetmap knows: target name -> aihwkit class name."""

from __future__ import annotations

NOISE_MODELS: dict[str, str] = {
    "pcm": "PCMLikeNoiseModel",
    "hermes": "HermesNoiseModel",
    "reram": "ReRamWan2022NoiseModel",
    "reram-cmo": "ReRamCMONoiseModel",
    "state-independent": "StateIndependentNoiseModel",
}
