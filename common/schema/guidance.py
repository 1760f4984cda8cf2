"""InvokeAI's LoRA and LCM-LoRA guidance, as numbers: the defaults lorafleet fills in.

lorafleet follows InvokeAI's "LoRAs & LCM-LoRAs" guide. Each constant below is one of its
recommendations, quoted where it comes from. They are starting points: a value a job gives
always wins, and straying from the advice earns a warning on the record, never a change.
"""

from __future__ import annotations

LORA_WEIGHT = 0.75
"""A LoRA's weight when the job gives none: "most LoRAs perform best at a weight of .75-1"."""
LCM_LORA_WEIGHT = 0.35
"""An LCM-LoRA's weight when the job gives none: "0.35 recommended as a starting point"."""
LORA_WEIGHT_BESIDE_LCM = 0.45
"""A standard LoRA's weight beside an LCM-LoRA: "0.45 being recommended as a starting point"."""
LCM_STEPS = 4
"""Steps under the LCM sampler when the job gives none: "reduced in the range of 4-8"."""
LCM_MAX_STEPS_ADVISED = 8
"""More steps than this under LCM earn a warning: the guide's range ends at 8."""
LCM_CFG = 1.0
"""CFG under the LCM sampler when the job gives none: "CFG-Scale should be reduced to ~1"."""
LCM_MAX_CFG_ADVISED = 2.0
"""A CFG above this under LCM earns a warning (about 1, with room for taste)."""
LORA_FOLDER = ("autoimport", "lora")
"""Where LoRA files are dropped, under the home: the guide's ``autoimport/lora`` folder."""
