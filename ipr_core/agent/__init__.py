"""The agent's side of the conversation: the ReAct turn format (`react`) and the one prompt
builder every stage, the trainer and the exporter use (`prompts`)."""
