"""A small multiple-choice task the task tests write as jsonl: (question, two choices, the right one)."""

ITEMS = [
    {"q": "The sky is", "choices": ["blue", "a cat"], "label": 0},
    {"q": "Water is", "choices": ["dry", "wet"], "label": 1},
    {"q": "Fire is", "choices": ["hot", "cold"], "label": 0},
    {"q": "Once upon a", "choices": ["time", "table"], "label": 0},
    {"q": "The girl was very", "choices": ["happy", "purple"], "label": 0},
    {"q": "Lily went to the", "choices": ["park", "seventeen"], "label": 0},
]
