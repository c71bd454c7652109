"""Methods that wrap or extend any backbone (LLaCTR; ELEC, ClickPrompt and SRP4CTR to come). See ``registry``."""
