"""Prompt families of the self-distillation set: the kinds of work Spec-Bench measures, none of its prompts.

Spec-Bench (Xia et al. 2024, "Unlocking Efficiency in Large Language Model Inference") measures
multi-turn chat, translation, summarisation, question answering, math reasoning and retrieval-style
answering over a passage. A drafter distilled from the target (EAGLE, Li et al. 2024; Medusa, Cai
et al. 2024) accepts well only on the kinds of text it was trained on, so the set covers each kind
with prompts built here from templates x topics x the target itself, and never reads the benchmark:

========== ====================================================================================
chat       2-3 turns: a first request, the target's own answer, a follow-up (and once more)
writing    emails, stories, poems, lists, letters, speeches ... on topics, for audiences, in tones
coding     write small programs (Python mostly, 9 other languages); explain, fix, test, port,
           review code the target wrote itself (bugs planted mechanically)
extraction fields, entities, numbers, JSON, answers from a passage the target wrote (RAG-like)
rag        several encyclopedia passages the target wrote, titled and run together as retrieved
           documents, then one short question on one of them (Spec-Bench's RAG layout)
qa         factual, how-to, why and comparison questions: templated, and written by the target
summarise  passages the target wrote, summarised in several styles
translate  English the target wrote, into French/German/Spanish/Chinese/...; and the target's
           own translations back into English (German -> English most, as WMT14 in Spec-Bench)
math       GSM8K *training* questions (``data/gsm8k_train``, MIT)
========== ====================================================================================

Every family is one function ``family(n, seed, ask) -> list[Conversation]`` returning ``n``
conversations (fewer only if the target's earlier replies were empty), deterministic given
``seed`` and ``ask``. ``ask(conversations) -> replies`` is the target's greedy answer to each
(:func:`specdec.training.distill.build` memoises it, so a conversation a family both asks for
material and returns as a row is generated once). Rows a family asked for material (the
passage before its summary, the code before its fix) are returned as rows too: every token the
target generates is kept.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from math import ceil

from specdec.tooling.data import DATA_DIR

Conversation = list[dict[str, str]]  # [{"role": "user" | "assistant", "content": ...}, ...], ends with a user turn
Ask = Callable[[list[Conversation]], list[str]]  # conversations -> the target's greedy replies, in order

GSM8K_TRAIN = DATA_DIR / "gsm8k_train" / "train.jsonl"

TOPICS = (
    "cooking", "gardening", "astronomy", "ancient Rome", "machine learning", "personal finance", "climate change",
    "football", "music theory", "chess", "the human heart", "volcanoes", "photography", "poetry", "travel in Japan",
    "job interviews", "electric cars", "the ocean", "birds", "coffee", "chemistry", "world history", "painting",
    "programming", "mental health", "architecture", "renewable energy", "dogs", "mathematics", "movies",
    "nutrition", "the stock market", "space exploration", "learning languages", "friendship", "insects",
    "medieval castles", "video games", "economics", "physics", "philosophy", "running a small business", "hiking",
    "the internet", "sleep", "writing a resume", "baking bread", "earthquakes", "the moon", "democracy",
    "recycling", "fashion", "first aid", "ancient Egypt", "robots", "cats", "weather", "marketing", "geography",
    "public speaking", "vaccines", "the Renaissance", "jazz", "cycling", "rainforests", "bees", "tea",
    "cryptography", "smartphones", "social media", "urban planning", "volunteering", "parenting", "yoga",
    "the Olympic Games", "dinosaurs", "the solar system", "electricity", "bridges", "trains", "airplanes",
    "time management", "negotiation", "climate policy", "farming", "wine", "chocolate", "the brain", "genetics",
    "antibiotics", "the printing press", "the Silk Road", "the Industrial Revolution", "the Cold War", "glaciers",
    "deserts", "coral reefs", "whales", "mushrooms", "knitting", "woodworking", "camping", "board games",
    "theatre", "opera", "comic books", "museums", "libraries", "online privacy", "cloud computing", "databases",
    "open-source software", "quantum computing", "solar panels", "water supply", "public transport",
    "moving to a new city", "starting university", "remote work", "customer service", "saving for retirement",
    "buying a house", "wedding planning", "pets", "horses", "sharks", "the immune system", "diabetes",
    "marathon training", "the Roman Empire", "Shakespeare", "mythology", "the French Revolution", "volcanic islands",
    "satellites", "3D printing", "artificial intelligence", "electric guitars", "street food", "spices",
)
AUDIENCES = ("a child", "a teenager", "a beginner", "a busy manager", "a retired teacher", "a university student",
             "a new employee", "a tourist", "an expert", "a customer", "a friend", "my neighbour")
TONES = ("friendly", "formal", "humorous", "persuasive", "calm", "enthusiastic", "polite but firm", "encouraging")
LENGTHS = ("in about 100 words", "in three short paragraphs", "in five sentences", "in under 80 words",
           "in two paragraphs", "briefly")

# -- chat -----------------------------------------------------------------------------------------------------
OPENERS = (
    "I'm planning a trip to learn about {topic}. Where should I start?",
    "Can you help me understand {topic}? I know nothing about it.",
    "I have to give a five-minute talk on {topic} tomorrow. Can you help me plan it?",
    "My friend says {topic} is boring. What would you tell them?",
    "What are three surprising facts about {topic}?",
    "I want to get better at {topic}. Can you make me a plan for the next month?",
    "Write a short introduction to {topic} for {audience}.",
    "What are the most common mistakes people make with {topic}?",
    "I'm writing a blog about {topic}. Can you suggest five post ideas?",
    "Explain {topic} to {audience} in simple words.",
    "What's the history of {topic}, in a few sentences?",
    "Give me a quiz with three questions about {topic}.",
    "Hi! I'm curious about {topic}. What should everyone know about it?",
    "Can you compare {topic} and {other} in a few points?",
    "I feel overwhelmed by {topic}. Any advice?",
    "Draft a {tone} message inviting my team to a workshop on {topic}.",
)
FOLLOW_UPS = (
    "Can you make that shorter?", "Give me a concrete example.", "Now rewrite it in a more formal tone.",
    "Explain the second point in more detail.", "Turn that into a numbered list.",
    "What would you say to someone who disagrees?", "Thanks! Summarise your answer in one sentence.",
    "Can you translate your answer into French?", "Why is that?", "Can you add a title to it?",
    "Rewrite it as a short poem.", "What are the risks or downsides?", "How would you explain this to {audience}?",
    "And how does this relate to {other}?", "Which of these is the most important, and why?",
    "Can you give me three more ideas?", "Make it more {tone}.", "What should I do first?",
    "Is there anything you left out?", "Can you put that in a table?", "What sources could I read to learn more?",
    "Now write a short email to a friend about it.", "Could you simplify the language?",
    "What is a common misconception about this?",
)

# -- writing --------------------------------------------------------------------------------------------------
WRITING = (
    "Write a {tone} email to {audience} about {topic}.",
    "Write a short story about {topic} {length}.",
    "Write a poem about {topic}.",
    "Write a haiku about {topic}.",
    "Write a limerick about {topic}.",
    "List ten tips about {topic} for {audience}.",
    "Write a blog post introduction about {topic} {length}.",
    "Write a product description for a new gadget related to {topic}.",
    "Write a cover letter for a job connected to {topic}.",
    "Write a {tone} speech about {topic} for a school assembly.",
    "Write a dialogue between two friends arguing about {topic}.",
    "Write a diary entry of someone who just discovered {topic}.",
    "Write an advertisement for a course on {topic}.",
    "Write a review of a book about {topic}.",
    "Write an outline for an essay on {topic}.",
    "Write a letter to the editor of a newspaper about {topic}, {tone} in tone.",
    "Write a social media post announcing an event about {topic}.",
    "Write a bedtime story for {audience} that involves {topic}.",
    "Write five interview questions for an expert on {topic}.",
    "Write a recipe-style guide to getting started with {topic}.",
    "Write a persuasive paragraph arguing that everyone should learn about {topic}.",
    "Write a thank-you note to {audience} who taught me about {topic}.",
    "Write a news headline and a short article about a discovery in {topic}.",
    "Write the opening scene of a play set in a world shaped by {topic}.",
)

# -- coding ---------------------------------------------------------------------------------------------------
LANGUAGES = ("Python",) * 9 + ("JavaScript",) * 3 + ("Java", "Java", "C", "C++", "C++", "Go", "Rust", "TypeScript",
                                                      "Bash", "C#")
CODE_TASKS = (
    "reverses a string", "checks whether a word is a palindrome", "returns the n-th Fibonacci number",
    "counts the vowels in a sentence", "finds the largest number in a list", "removes duplicates from a list",
    "sorts a list of names alphabetically", "computes the factorial of a number", "checks whether a number is prime",
    "converts Celsius to Fahrenheit", "merges two sorted lists", "counts how often each word appears in a text",
    "computes the average of a list of numbers", "finds the second largest element of an array",
    "implements binary search", "implements bubble sort", "flattens a nested list", "validates an email address",
    "reads a CSV file and prints each row", "returns the greatest common divisor of two numbers",
    "checks whether two strings are anagrams", "generates a random password", "converts a number to Roman numerals",
    "capitalises the first letter of every word", "computes the sum of the digits of a number",
    "transposes a matrix", "finds the longest word in a sentence", "implements a stack with push and pop",
    "implements a simple queue", "rotates a list by k positions", "checks if brackets in a string are balanced",
    "counts the lines in a file", "returns the intersection of two lists", "computes compound interest",
    "converts a binary string to an integer", "prints the multiplication table of a number",
    "finds all even numbers in a list", "implements a simple to-do list in memory",
    "computes the distance between two points", "groups words by their first letter", "parses a date string",
    "finds the missing number in a list from 1 to n", "merges two dictionaries", "computes a running total",
    "implements FizzBuzz", "checks whether a year is a leap year", "counts the characters in a string without spaces",
    "returns the n largest items of a list", "converts a list of pairs into a dictionary", "implements a linked list",
)
CODE_ASKS = ("Write a {lang} function that {task}.", "Write a {lang} program that {task}.",
             "Show me how to write {lang} code that {task}, with comments.",
             "Write a short {lang} function that {task}, and give an example call.")
CODE_DERIVED = (
    "Explain what this {lang} code does, step by step:\n\n```{tag}\n{code}\n```",
    "This {lang} code has a bug. Find it and fix it:\n\n```{tag}\n{code}\n```",
    "Write unit tests for this {lang} code:\n\n```{tag}\n{code}\n```",
    "Rewrite this {lang} code in {other_lang}:\n\n```{tag}\n{code}\n```",
    "Review this {lang} code and suggest improvements:\n\n```{tag}\n{code}\n```",
    "Add comments to this {lang} code so a beginner can follow it:\n\n```{tag}\n{code}\n```",
    "What is the time complexity of this {lang} code? Explain.\n\n```{tag}\n{code}\n```",
)
_BUGS = ((" + ", " - "), (" < ", " <= "), (" > ", " >= "), (" == ", " != "), ("return ", "print("),
         ("[i]", "[i + 1]"), (" and ", " or "), ("0", "1"), (":\n", "\n"), (";", ""))

# -- passages (extraction, summarise, translate) --------------------------------------------------------------
FACT_GENRES = ("news report", "company announcement", "short biography", "event invitation", "sports match report",
               "travel itinerary", "set of meeting minutes", "job posting", "school newsletter item",
               "press release", "police report", "product recall notice", "weather bulletin", "museum exhibit label")
FACT_ASK = ("Write a {genre} about {topic}. Include names of people and places, dates and numbers. "
            "Reply with the text only.")
EXTRACTIONS = (
    "Extract every person, place and organisation named in the text below. Answer as JSON with the keys "
    "\"people\", \"places\" and \"organisations\".\n\nText:\n{passage}",
    "List all the numbers in this passage and what each one refers to.\n\n{passage}",
    "{passage}\n\nFrom the text above, pull out the date, the location and the main people involved, as a bullet list.",
    "Read the passage and answer the question using only the passage.\n\nPassage:\n{passage}\n\nQuestion: {question}",
    "Turn the key facts of the following text into a JSON object.\n\n{passage}",
    "Fill in a table with the columns Name | Role | Detail from this text:\n\n{passage}",
    "Passage:\n{passage}\n\nQuestion: {question}\nAnswer briefly, quoting the passage where you can.",
    "What are the three most important facts in this text? Quote the sentence each one comes from.\n\n{passage}",
)
PASSAGE_QUESTIONS = ("Who is the main person in the passage, and what do they do?", "When and where does this happen?",
                     "What is the most important number mentioned, and what does it measure?",
                     "What happens next, according to the text?", "Why is this event important?",
                     "Which organisations are involved?", "What problem does the text describe, and what is the fix?")
ARTICLE_GENRES = ("news article", "encyclopedia entry", "blog post", "opinion column", "report", "short story",
                  "lecture summary", "product review", "scientific abstract", "history lesson", "interview",
                  "travel guide section", "book chapter opening", "magazine feature")
ARTICLE_ASK = "Write a {genre} about {topic} {length}. Reply with the text only."
SUMMARIES = (
    "Summarise the following {genre} in {k} sentences.\n\n{passage}",
    "{passage}\n\nSummarise the text above in one sentence.",
    "Give a TL;DR of this {genre}:\n\n{passage}",
    "Summarise this as three bullet points:\n\n{passage}",
    "Write a headline and a two-sentence summary for this {genre}.\n\n{passage}",
    "Summarise the following for {audience}:\n\n{passage}",
    "Article:\n{passage}\n\nWrite a short summary of the article.",
    "What is the main point of this text? Answer in a few sentences.\n\n{passage}",
)
TARGET_LANGUAGES = ("German",) * 5 + ("French",) * 3 + ("Spanish",) * 3 + ("Chinese",) * 2 + (
    "Italian", "Portuguese", "Dutch", "Japanese", "Russian")
SOURCE_ASK = ("Write {k} sentences about {topic}. Reply with the sentences only.",
              "Write a short note to {audience} about {topic}. Reply with the note only.",
              "Describe {topic} in a short paragraph. Reply with the paragraph only.")
TO_FOREIGN = ("Translate the following text into {lang}:\n\n{text}", "Translate to {lang}: {text}",
              "Please translate this into {lang}.\n\n{text}", "{text}\n\nTranslate the text above into {lang}.")
TO_ENGLISH = ("Translate this {lang} text into English:\n\n{text}", "Translate from {lang} to English: {text}",
              "What does this mean in English?\n\n{text}")
PHRASES = ("Where is the train station?", "I would like a cup of coffee, please.", "How much does this cost?",
           "The meeting has been moved to Thursday afternoon.", "Could you help me carry these bags?",
           "We are closed on Sundays and public holidays.", "My flight was delayed by two hours.",
           "Please send me the report before Friday.", "The weather will be sunny tomorrow.",
           "I have lived in this city for ten years.", "Thank you for your patience.",
           "The children are playing in the garden.", "Turn left at the second traffic light.",
           "Do you have a table for four people?", "The museum opens at nine in the morning.",
           "I forgot my password and cannot log in.", "She is studying medicine at the university.",
           "Our new product will be available next month.", "Can I pay by card?", "The library is next to the bank.")

# -- question answering ---------------------------------------------------------------------------------------
QA_TEMPLATES = (
    "What is {topic}, and why does it matter?", "How do I get started with {topic}?",
    "Explain {topic} in simple terms.", "What are the main ideas behind {topic}?",
    "What is the difference between {topic} and {other}?", "Why do people care about {topic}?",
    "What are the pros and cons of {topic}?", "How has {topic} changed over the last hundred years?",
    "What are five key facts about {topic}?", "How does {topic} affect everyday life?",
    "Who are some famous people associated with {topic}?", "What should {audience} know about {topic}?",
    "Step by step, how would a beginner learn {topic}?", "What are common myths about {topic}?",
)
QUESTION_KINDS = ("factual", "how-to", "why", "comparison", "history", "practical", "beginner's", "surprising")
QUESTION_ASK = ("Write one {kind} question someone might ask about {topic}. Reply with the question only.",
                "Write a {kind} question about {topic} that starts with \"{opener}\". Reply with the question only.")
QUESTION_OPENERS = ("How", "Why", "What", "Which", "When", "Can", "Is it true that", "Should I", "What happens if")

MATH_STYLES = ("{q}", "{q}", "{q}", "{q}", "{q} Let's think step by step.", "Solve this problem and show your work: {q}",
               "{q} Explain your reasoning.")


def _rng(seed: int, family: str) -> random.Random:
    return random.Random(f"{seed}:{family}")  # str seeds hash with SHA-512: the same in every process


def _user(text: str) -> Conversation:
    return [{"role": "user", "content": text}]


def _distinct(n: int, draw: Callable[[], object]) -> list:
    """``n`` distinct results of ``draw()`` (fewer only if 50 n draws find no more)."""
    out, seen = [], set()
    for _ in range(50 * n):
        if len(out) == n:
            break
        value = draw()
        if repr(value) not in seen:
            seen.add(repr(value))
            out.append(value)
    return out


def _slots(rng: random.Random) -> dict[str, str]:
    """Template slots drawn once per prompt (each template takes the ones it names)."""
    topic, other = rng.sample(TOPICS, 2)
    return {"topic": topic, "other": other, "audience": rng.choice(AUDIENCES), "tone": rng.choice(TONES),
            "length": rng.choice(LENGTHS), "k": str(rng.choice((2, 3, 4)))}


def _first_line(text: str) -> str:
    """A reply cut to its first non-empty line, quotes and a leading label removed."""
    line = next((s for s in text.strip().splitlines() if s.strip()), "")
    line = re.sub(r"^(question|q)\s*[:.]\s*", "", line.strip(), flags=re.I)
    return line.strip().strip("\"'").strip()


def _sentences(text: str, k: int, words: int = 60) -> str:
    """The first ``k`` sentences (or lines) of ``text``, at most about ``words`` words: translation sources are
    sentences, as in WMT."""
    parts = [x.strip() for x in re.split(r"(?<=[.!?])\s+|(?<=\u3002)|\n+", text.strip()) if x.strip()]
    out = ("" if "\u3002" in text else " ").join(parts[:k])  # Chinese/Japanese sentences join without spaces
    return " ".join(out.split(" ")[:words])


def _code(reply: str) -> tuple[str, str] | None:
    """The first fenced code block of a reply as (tag, code), else the reply itself; None when empty."""
    found = re.search(r"```([\w+#-]*)\n(.*?)```", reply, flags=re.S)
    tag, code = (found.group(1), found.group(2)) if found else ("", reply)
    code = code.strip("\n")
    return (tag, code) if code.strip() else None


def _plant_bug(code: str, rng: random.Random) -> str:
    """``code`` with one mechanical bug (an operator swapped, a colon dropped ...); unchanged if none applies."""
    options = [(a, b) for a, b in _BUGS if a in code]
    if not options:
        return code
    a, b = rng.choice(options)
    spots = [m.start() for m in re.finditer(re.escape(a), code)]
    at = rng.choice(spots)
    return code[:at] + b + code[at + len(a):]


def chat(n: int, seed: int, ask: Ask) -> list[Conversation]:
    """``n`` chat rows: first turns, then the target's answer plus a follow-up (2 turns), and once more (3)."""
    rng = _rng(seed, "chat")
    chains = ceil(n * 2 / 5)
    seconds = min(chains, n - chains)
    thirds = n - chains - seconds
    convs = _distinct(chains, lambda: _user(rng.choice(OPENERS).format(**_slots(rng))))
    rows = list(convs)
    for turns in (seconds, thirds):
        replies = ask(convs[:turns])
        convs = [c + [{"role": "assistant", "content": r.strip()},
                      {"role": "user", "content": rng.choice(FOLLOW_UPS).format(**_slots(rng))}]
                 for c, r in zip(convs[:turns], replies) if r.strip()]
        rows += convs
    return rows


def writing(n: int, seed: int, ask: Ask | None = None) -> list[Conversation]:
    """``n`` writing requests: form x topic x audience x tone x length."""
    rng = _rng(seed, "writing")
    return _distinct(n, lambda: _user(rng.choice(WRITING).format(**_slots(rng))))


def coding(n: int, seed: int, ask: Ask) -> list[Conversation]:
    """``n`` coding rows: write a small program; then explain, fix (a planted bug), test, port or review the
    code the target wrote."""
    rng = _rng(seed, "coding")
    writes = ceil(n / 2)
    pairs = _distinct(writes, lambda: (rng.choice(LANGUAGES), rng.choice(CODE_ASKS), rng.choice(CODE_TASKS)))
    langs = [lang for lang, _, _ in pairs]
    rows = [_user(ask_.format(lang=lang, task=task)) for lang, ask_, task in pairs]
    derived = []
    for lang, reply in zip(langs, ask(rows[: n - writes])):
        found = _code(reply)
        if found is None:
            continue
        tag, code = found
        template = rng.choice(CODE_DERIVED)
        if "bug" in template:
            code = _plant_bug(code, rng)
        other = rng.choice([x for x in LANGUAGES if x != lang])
        derived.append(_user(template.format(lang=lang, tag=tag or lang.lower(), code=code, other_lang=other)))
    return rows + derived


def _passages(rng: random.Random, count: int, ask_template: str, genres: tuple[str, ...], ask: Ask
              ) -> tuple[list[Conversation], list[tuple[str, str]]]:
    """``count`` passage requests (rows) and the target's non-empty passages as (genre, text)."""
    def draw() -> tuple[str, str]:
        genre = rng.choice(genres)
        return genre, ask_template.format(genre=genre, **_slots(rng))

    drawn = _distinct(count, draw)
    genres_drawn, rows = [g for g, _ in drawn], [_user(text) for _, text in drawn]
    texts = [(g, r.strip()) for g, r in zip(genres_drawn, ask(rows)) if r.strip()]
    return rows, texts


def extraction(n: int, seed: int, ask: Ask) -> list[Conversation]:
    """``n`` extraction rows: fact-dense passages the target wrote, then fields/entities/numbers/answers
    pulled out of each (two per passage)."""
    rng = _rng(seed, "extraction")
    count = ceil(n / 3)
    rows, texts = _passages(rng, count, FACT_ASK, FACT_GENRES, ask)
    uses = [(passage, template) for _, passage in texts for template in rng.sample(EXTRACTIONS, 2)]
    rows += [_user(template.format(passage=passage, question=rng.choice(PASSAGE_QUESTIONS)))
             for passage, template in uses[: n - count]]
    return rows


RAG_ASK = "Write a {genre} about {topic} in one paragraph of about 120 words. Reply with the text only."
RAG_GENRES = ("encyclopedia entry", "encyclopedia entry", "reference article", "glossary entry")
RAG_QUESTIONS = ("What is {topic}?", "Who is known for work on {topic}?", "When did {topic} begin?",
                 "Where is {topic} most common?", "Why is {topic} important?", "how does {topic} work",
                 "what is the main use of {topic}", "name one fact about {topic}", "who invented {topic}",
                 "what are the parts of {topic}")


def rag(n: int, seed: int, ask: Ask) -> list[Conversation]:
    """``n`` retrieval-style rows: short encyclopedia passages the target wrote (those requests are rows),
    then prompts of 3-5 of them, each titled with its topic and run together as retrieved documents, with
    a short question on one of them at the end (Spec-Bench's RAG layout: the passages, then the question)."""
    rng = _rng(seed, "rag")
    count = ceil(n / 4)
    topics: list[str] = []

    def draw() -> tuple[str, str]:
        topic = rng.choice(TOPICS)
        topics.append(topic)
        return topic, RAG_ASK.format(genre=rng.choice(RAG_GENRES), topic=topic)

    drawn = _distinct(count, draw)
    rows = [_user(text) for _, text in drawn]
    docs = [(topic, r.strip()) for (topic, _), r in zip(drawn, ask(rows)) if r.strip()]
    if len(docs) >= 3:
        for _ in range(n - len(rows)):
            picked = rng.sample(docs, min(len(docs), rng.choice((3, 4, 5))))
            topic = rng.choice(picked)[0]
            body = "\n".join(f"{t[:1].upper() + t[1:]} {text}" for t, text in picked)
            rows.append(_user(f"{body}\n{rng.choice(RAG_QUESTIONS).format(topic=topic)}"))
    return rows


def summarise(n: int, seed: int, ask: Ask) -> list[Conversation]:
    """``n`` summarising rows: articles the target wrote, then two summaries of each in different styles."""
    rng = _rng(seed, "summarise")
    count = ceil(n / 3)
    rows, texts = _passages(rng, count, ARTICLE_ASK, ARTICLE_GENRES, ask)
    uses = [(genre, passage, template) for genre, passage in texts for template in rng.sample(SUMMARIES, 2)]
    rows += [_user(template.format(passage=passage, genre=genre, audience=rng.choice(AUDIENCES),
                                   k=rng.choice(("2", "3", "4")))) for genre, passage, template in uses[: n - count]]
    return rows


def translate(n: int, seed: int, ask: Ask) -> list[Conversation]:
    """``n`` translation rows: the first sentences of English texts the target wrote, and phrasebook sentences,
    into other languages; and the target's own translations back into English."""
    rng = _rng(seed, "translate")
    sources = ceil(n / 4)
    rows = _distinct(sources, lambda: _user(rng.choice(SOURCE_ASK).format(**_slots(rng))))
    texts = [_sentences(r, rng.choice((1, 2, 3))) for r in ask(rows)]
    texts = [t for t in texts if t] + [rng.choice(PHRASES) for _ in range(ceil(n / 8))]
    forward = min(len(texts), ceil((n - sources) / 2))
    langs = [rng.choice(TARGET_LANGUAGES) for _ in range(forward)]
    to_foreign = [_user(rng.choice(TO_FOREIGN).format(lang=lang, text=text)) for lang, text in zip(langs, texts)]
    rows += to_foreign
    back = n - len(rows)
    for lang, reply in zip(langs[:back], ask(to_foreign[:back])):
        text = _sentences(reply, 3, words=80)
        if text:
            rows.append(_user(rng.choice(TO_ENGLISH).format(lang=lang, text=text)))
    return rows


def qa(n: int, seed: int, ask: Ask) -> list[Conversation]:
    """``n`` question-answering rows: templated questions, and questions the target wrote on request
    (the request is a row too)."""
    rng = _rng(seed, "qa")
    written = n // 4
    requests = _distinct(written, lambda: _user(rng.choice(QUESTION_ASK).format(
        kind=rng.choice(QUESTION_KINDS), topic=rng.choice(TOPICS), opener=rng.choice(QUESTION_OPENERS))))
    questions = [_first_line(r) for r in ask(requests)]
    rows = requests + [_user(q) for q in questions if len(q) > 8]
    rows += _distinct(n - len(rows), lambda: _user(rng.choice(QA_TEMPLATES).format(**_slots(rng))))
    return rows


def math(n: int, seed: int, ask: Ask | None = None) -> list[Conversation]:
    """``n`` GSM8K training questions (a seeded sample, MIT licence), a few with a reasoning cue."""
    questions = [json.loads(line)["question"] for line in GSM8K_TRAIN.read_text().splitlines() if line.strip()]
    rng = _rng(seed, "math")
    return [_user(rng.choice(MATH_STYLES).format(q=q)) for q in rng.sample(questions, min(n, len(questions)))]


FAMILIES: dict[str, Callable[[int, int, Ask], list[Conversation]]] = {
    "chat": chat, "writing": writing, "coding": coding, "extraction": extraction, "qa": qa,
    "summarise": summarise, "translate": translate, "math": math, "rag": rag}
