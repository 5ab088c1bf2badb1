"""`confedge setup` and `confedge import-reference`: the configuration file written for the
operator, from questions (wizard.py, questions.py), answers files and `--set` (command.py), or a
reference appliance's files (reference.py), edited in place without losing what the operator wrote
(document.py)."""
