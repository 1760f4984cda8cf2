"""LoRAs as both sides see them, without torch; each module imports only the ones above it.

files     one .safetensors file: header checks, family, format, LoraInfo
registry  names shared across machines: Redis entries and objects in the store
catalog   a name for a job: the drop folder first, then the registry
"""
