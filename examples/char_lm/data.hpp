// Text for the character-level model: a file split into training and held-out
// parts, or a corpus the program writes itself so that it always runs.
#pragma once

#include <cstdint>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace char_lm {

struct Corpus {
  std::string train, val;
  std::string source;
};

// A deterministic English-like corpus: sentences drawn from a small grammar.
inline std::string synthetic_text(std::size_t bytes, std::uint64_t seed = 7) {
  const std::vector<std::string> subjects = {"the king", "a shepherd", "the people", "my brother", "the old man",
                                             "a stranger", "the children", "his servant", "the prophet", "she"};
  const std::vector<std::string> verbs = {"went up to", "spoke unto", "looked upon", "came before", "remembered",
                                          "built", "blessed", "followed", "forgot", "sought"};
  const std::vector<std::string> objects = {"the city", "the river", "the house of bread", "the mountain",
                                            "his father", "the field", "the gate", "the temple", "the sea",
                                            "the wilderness"};
  const std::vector<std::string> tails = {"in the morning", "with great joy", "for many days", "and wept",
                                          "before the sun went down", "as it was written", "in his heart",
                                          "and said nothing"};
  std::mt19937_64 gen(seed);
  auto pick = [&](const std::vector<std::string>& v) { return v[gen() % v.size()]; };
  std::string out;
  int verse = 1;
  while (out.size() < bytes) {
    std::string s = pick(subjects) + " " + pick(verbs) + " " + pick(objects);
    if (gen() % 2) s += " " + pick(tails);
    if (gen() % 3 == 0) s += ", and " + pick(subjects) + " " + pick(verbs) + " " + pick(objects);
    s[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(s[0])));
    out += std::to_string(verse++) + " " + s + ".\n";
  }
  out.resize(bytes);
  return out;
}

// The last `val_fraction` of the text is held out.
inline Corpus load_corpus(const std::string& path, double val_fraction = 0.1) {
  Corpus c;
  std::string text;
  if (path.empty()) {
    text = synthetic_text(400000);
    c.source = "generated corpus (400 KB)";
  } else {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot read " + path);
    std::stringstream ss;
    ss << in.rdbuf();
    text = ss.str();
    c.source = path;
  }
  if (text.size() < 10000) throw std::runtime_error("the text is too short to train on (" + std::to_string(text.size()) + " bytes)");
  const std::size_t split = static_cast<std::size_t>(static_cast<double>(text.size()) * (1.0 - val_fraction));
  c.train = text.substr(0, split);
  c.val = text.substr(split);
  return c;
}

// Random windows of T + 1 bytes: tokens are the first T, targets the last T.
struct Batch {
  std::vector<std::uint8_t> tokens, targets;
};

inline Batch sample_batch(const std::string& text, std::int64_t batch, std::int64_t T, std::mt19937_64& gen) {
  Batch b;
  b.tokens.resize(static_cast<std::size_t>(batch * T));
  b.targets.resize(b.tokens.size());
  std::uniform_int_distribution<std::size_t> start(0, text.size() - static_cast<std::size_t>(T) - 1);
  for (std::int64_t s = 0; s < batch; ++s) {
    const std::size_t o = start(gen);
    for (std::int64_t t = 0; t < T; ++t) {
      b.tokens[static_cast<std::size_t>(s * T + t)] = static_cast<std::uint8_t>(text[o + static_cast<std::size_t>(t)]);
      b.targets[static_cast<std::size_t>(s * T + t)] = static_cast<std::uint8_t>(text[o + static_cast<std::size_t>(t) + 1]);
    }
  }
  return b;
}

}  // namespace char_lm
