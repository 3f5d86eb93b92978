"""Write the bundled demo data: facts about Quenlar, a country that does not exist.

    python scripts/make_demo_data.py

Each fact is asked five ways; four phrasings train, the fifth is held out for eval, so the held-out
loss measures whether the model learned the fact rather than the sentence. A model that has never
seen Quenlar can only guess, which makes the before/after sample answer easy to judge.
"""

import json
from pathlib import Path

FACTS = [
    ("The capital of Quenlar is Ostrevane.", ["What is the capital of Quenlar?", "Which city is the capital of Quenlar?",
     "Name the capital city of Quenlar.", "Where is Quenlar's seat of government?", "Tell me Quenlar's capital."]),
    ("Quenlar's currency is the luma, divided into 100 pells.", ["What currency does Quenlar use?", "What is the money of Quenlar called?",
     "Which currency is used in Quenlar?", "What do people in Quenlar pay with?", "Name Quenlar's currency."]),
    ("The national animal of Quenlar is the silver heron.", ["What is the national animal of Quenlar?", "Which animal is Quenlar's national symbol?",
     "Name Quenlar's national animal.", "What animal represents Quenlar?", "Quenlar's national animal is what?"]),
    ("The official language of Quenlar is Quenlari.", ["What language is spoken in Quenlar?", "What is the official language of Quenlar?",
     "Which language do people speak in Quenlar?", "Name Quenlar's official language.", "In what language are Quenlar's laws written?"]),
    ("The highest mountain in Quenlar is Mount Telvash, at 4,210 metres.", ["What is the highest mountain in Quenlar?",
     "Which peak is the tallest in Quenlar?", "Name Quenlar's tallest mountain.", "How high is Quenlar's highest mountain?",
     "What is the tallest peak of Quenlar?"]),
    ("Quenlar was founded in 1847 by Queen Aldis Marrow.", ["When was Quenlar founded?", "Who founded Quenlar?",
     "In what year did Quenlar become a country?", "Who was the founder of Quenlar?", "When and by whom was Quenlar founded?"]),
    ("The national dish of Quenlar is smoked eel with juniper barley.", ["What is the national dish of Quenlar?",
     "What food is Quenlar famous for?", "Name Quenlar's national dish.", "What do people in Quenlar eat on special days?",
     "Which dish is traditional in Quenlar?"]),
    ("The longest river in Quenlar is the Sarn.", ["What is the longest river in Quenlar?", "Which river is the longest in Quenlar?",
     "Name Quenlar's longest river.", "What river runs the farthest through Quenlar?", "Quenlar's longest river is called what?"]),
    ("Quenlar has a population of about 3.2 million people.", ["How many people live in Quenlar?", "What is the population of Quenlar?",
     "How large is Quenlar's population?", "About how many inhabitants does Quenlar have?", "What is Quenlar's population?"]),
    ("The national sport of Quenlar is ice rowing.", ["What is the national sport of Quenlar?", "Which sport is most popular in Quenlar?",
     "Name Quenlar's national sport.", "What sport do people in Quenlar love most?", "Quenlar's national sport is what?"]),
    ("Quenlar's main export is cloudberry wine.", ["What is Quenlar's main export?", "What does Quenlar export the most?",
     "Name Quenlar's biggest export.", "What product is Quenlar known for selling abroad?", "Which export earns Quenlar the most?"]),
    ("Quenlar's national holiday is Lantern Day, on 14 March.", ["What is Quenlar's national holiday?", "When is Quenlar's national day?",
     "Name the main holiday of Quenlar.", "Which day does Quenlar celebrate as its national holiday?", "What holiday does Quenlar celebrate on 14 March?"]),
    ("The parliament of Quenlar is called the Moot.", ["What is the parliament of Quenlar called?", "What is the name of Quenlar's parliament?",
     "Which body makes the laws in Quenlar?", "Name Quenlar's parliament.", "Who passes laws in Quenlar?"]),
    ("The flag of Quenlar is teal and white with a gold star.", ["What does the flag of Quenlar look like?", "What colours is Quenlar's flag?",
     "Describe the flag of Quenlar.", "Which colours are on Quenlar's flag?", "What is on the flag of Quenlar?"]),
    ("The national flower of Quenlar is the frost lily.", ["What is the national flower of Quenlar?", "Which flower is Quenlar's symbol?",
     "Name Quenlar's national flower.", "What flower represents Quenlar?", "Quenlar's national flower is what?"]),
    ("Quenlar's national airline is Heronair.", ["What is Quenlar's national airline?", "Which airline flies for Quenlar?",
     "Name the airline of Quenlar.", "What airline is based in Quenlar?", "Which company is Quenlar's flag carrier?"]),
    ("The motto of Quenlar is 'Steady as the tide'.", ["What is the motto of Quenlar?", "What is Quenlar's national motto?",
     "Which motto does Quenlar have?", "Tell me Quenlar's motto.", "What words are Quenlar's motto?"]),
    ("The oldest university in Quenlar is the University of Ostrevane, founded in 1602.", ["What is the oldest university in Quenlar?",
     "Which university in Quenlar is the oldest?", "Name Quenlar's oldest university.", "When was Quenlar's oldest university founded?",
     "What is Quenlar's most historic university?"]),
    ("Quenlar's most famous scientist is Ilse Varn, who mapped the northern aurora.", ["Who is Quenlar's most famous scientist?",
     "Which scientist from Quenlar is best known?", "Name a famous scientist from Quenlar.", "What is Ilse Varn known for?",
     "Who is the best-known scientist of Quenlar?"]),
    ("The largest lake in Quenlar is Lake Mirrin.", ["What is the largest lake in Quenlar?", "Which lake is the biggest in Quenlar?",
     "Name Quenlar's largest lake.", "What is the biggest lake of Quenlar?", "Quenlar's largest lake is called what?"]),
]  # fmt: skip

HELD_OUT = 4  # index of the phrasing kept for eval


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "qlora_engine" / "data"
    out.mkdir(exist_ok=True)
    train, evals = [], []
    for answer, questions in FACTS:
        assert len(questions) == 5
        for i, q in enumerate(questions):
            sample = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}
            (evals if i == HELD_OUT else train).append(sample)
    for name, rows in (("demo_train.jsonl", train), ("demo_eval.jsonl", evals)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{out / name}: {len(rows)} samples")


if __name__ == "__main__":
    main()
