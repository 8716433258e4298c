"""The method registry: name -> "module:Class". Adding a method = one file plus one line here.

Strings, not classes, so that this file imports nothing and a method is only imported when used.
"""

METHODS = {
    "lora": "adapters.lora:LoRA",
    "dora": "adapters.dora:DoRA",
    "loldu": "adapters.loldu:LoLDU",
    "flora": "adapters.flora:FLoRA",
    "sara": "adapters.sara:SaRA",
    "tlora": "adapters.tlora:TLoRA",
}
