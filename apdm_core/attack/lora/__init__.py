"""LoRA DreamBooth: settings (``settings.LoRASettings``) and the attack (``attack.LoRAAttack``)."""
