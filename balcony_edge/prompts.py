"""Prompts for the teacher's chat corpus (topics x kinds of request) and the fixed chat-quality prompts.

The two sets share no prompt: the quality prompts are phrased by hand and never generated from these templates,
so the chat-quality check measures answers to requests the balconies were not trained on.
"""

from __future__ import annotations

import random

TOPICS = (
    "a bicycle", "photosynthesis", "the water cycle", "a refrigerator", "vaccines", "black holes", "compound interest",
    "a job interview", "learning a new language", "sleep", "coffee", "the Roman Empire", "volcanoes", "electric cars",
    "a garden in spring", "recycling", "the internet", "a city bus system", "chess", "bread baking", "the moon",
    "a first aid kit", "budgeting for a family", "climate change", "honeybees", "a rainy afternoon", "friendship",
    "a small bakery", "solar panels", "the human heart", "a hiking trip", "music practice", "public libraries",
    "a lost cat", "time management", "earthquakes", "a birthday party", "the printing press", "rivers",
    "machine learning", "a train journey", "healthy breakfast", "a robot", "the ocean floor", "a thunderstorm",
    "writing a resume", "a museum visit", "batteries", "a dragon", "renting an apartment", "the night sky",
    "a football match", "a power outage", "teaching a child to read", "passwords", "a winter morning",
    "the French Revolution", "a houseplant", "a microwave oven", "a mountain village", "a spreadsheet",
    "a camping stove", "a new neighbour", "the immune system", "a wedding toast", "saving energy at home",
    "a volunteer project", "a street market", "a lighthouse", "a sore throat", "a video call", "an old clock",
    "the alphabet", "penguins", "a road trip", "a science fair", "a kitchen knife", "an email to a landlord",
    "a coral reef", "a thank-you note", "a school timetable", "a snowstorm", "traffic lights", "a telescope",
    "a sandwich", "a marathon", "the planets", "a dentist appointment", "a desert", "a charity run",
)

TASKS = (
    "Explain {topic} to a ten-year-old.",
    "What are three interesting facts about {topic}?",
    "Write a short poem about {topic}.",
    "Write a short story that involves {topic}.",
    "Give me practical tips related to {topic}.",
    "What are the pros and cons of {topic}?",
    "Describe {topic} in one paragraph.",
    "How would you explain {topic} to someone who has never heard of it?",
    "Write a friendly message to a colleague about {topic}.",
    "List five questions a student might ask about {topic}, with short answers.",
    "What is the history of {topic}?",
    "Summarize the most important things to know about {topic}.",
    "Write a dialogue between two friends talking about {topic}.",
    "What mistakes do people often make with {topic}?",
    "Give step-by-step instructions for something involving {topic}.",
    "Compare {topic} with something similar and explain the differences.",
    "Why does {topic} matter in everyday life?",
    "Write a short advertisement for {topic}.",
    "Tell me a joke about {topic}.",
    "Write a diary entry about a day that involved {topic}.",
    "What would a beginner need to know about {topic}?",
    "Describe {topic} using all five senses.",
    "Write a haiku about {topic}, then explain it.",
    "Answer briefly: what is {topic}?",
)

SYSTEM_PROMPTS = (
    None,  # the model's own default system message (its chat template supplies one)
    "You are a concise assistant. Answer in at most three sentences.",
    "You are a friendly tutor who explains things step by step.",
    "You are a creative writer.",
)

# The chat-quality check: 20 prompts phrased by hand, of kinds a user of a small chat model sends.
QUALITY_PROMPTS = (
    "What is the capital of France?",
    "Give me three ideas for a quick vegetarian dinner.",
    "How do I make a cup of tea?",
    "Write a two-line poem about the sea.",
    "What does a CPU do in a computer?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Suggest a name for a pet goldfish.",
    "How many days are there in a leap year?",
    "What should I pack for a weekend at the beach?",
    "Write a short thank-you message to my teacher.",
    "What is 12 times 12?",
    "Explain what gravity is in one sentence.",
    "Tell me a fun fact about elephants.",
    "How can I fall asleep faster?",
    "What is the difference between weather and climate?",
    "Write the opening sentence of a mystery novel.",
    "Give me a tip for learning to play the guitar.",
    "What are the primary colours?",
    "How do airplanes stay in the air?",
)


def chat_prompts(count: int, seed: int = 0) -> list[tuple[str | None, str]]:
    """`count` distinct (system message or None, user prompt) pairs, drawn without replacement from topics x tasks."""
    pairs = [(task.format(topic=topic)) for topic in TOPICS for task in TASKS]
    rng = random.Random(seed)
    rng.shuffle(pairs)
    chosen = pairs[: min(count, len(pairs))]
    return [(SYSTEM_PROMPTS[i % len(SYSTEM_PROMPTS)], prompt) for i, prompt in enumerate(chosen)]
