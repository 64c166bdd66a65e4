"""The workflow engine: the public workflow types, the typing layer that turns replicated JSON into the
user's classes and back, and (with the Manager) the workers that run steps."""
