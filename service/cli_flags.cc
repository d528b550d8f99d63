#include "service/cli_flags.h"

#include <cstdio>
#include <cstdlib>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace engram {

FlagSet::FlagSet(std::string program, std::string usage)
    : program_(std::move(program)), usage_(std::move(usage)) {}

void FlagSet::String(const std::string& name, std::string* target, const std::string& help) {
  flags_.push_back({name, help, target->empty() ? "" : "\"" + *target + "\"", false,
                    [target](const std::string& v) {
                      *target = v;
                      return absl::OkStatus();
                    }});
}

void FlagSet::StringList(const std::string& name, std::vector<std::string>* target,
                         const std::string& help) {
  flags_.push_back({name, help + " (repeatable)", absl::StrJoin(*target, ","), false,
                    [target](const std::string& v) {
                      target->push_back(v);
                      return absl::OkStatus();
                    }});
}

void FlagSet::Int(const std::string& name, int64_t* target, const std::string& help) {
  flags_.push_back({name, help, absl::StrCat(*target), false, [target, name](const std::string& v) {
                      if (!absl::SimpleAtoi(v, target)) {
                        return absl::InvalidArgumentError(
                            absl::StrCat("--", name, " wants an integer, got '", v, "'"));
                      }
                      return absl::OkStatus();
                    }});
}

void FlagSet::Double(const std::string& name, double* target, const std::string& help) {
  flags_.push_back({name, help, absl::StrCat(*target), false, [target, name](const std::string& v) {
                      if (!absl::SimpleAtod(v, target)) {
                        return absl::InvalidArgumentError(
                            absl::StrCat("--", name, " wants a number, got '", v, "'"));
                      }
                      return absl::OkStatus();
                    }});
}

void FlagSet::Bool(const std::string& name, bool* target, const std::string& help) {
  flags_.push_back({name, help, *target ? "true" : "false", true, [target, name](const std::string& v) {
                      if (!absl::SimpleAtob(v, target)) {
                        return absl::InvalidArgumentError(
                            absl::StrCat("--", name, " wants true or false, got '", v, "'"));
                      }
                      return absl::OkStatus();
                    }});
}

const FlagSet::Flag* FlagSet::Find(const std::string& name) const {
  for (const auto& f : flags_) {
    if (f.name == name) return &f;
  }
  return nullptr;
}

absl::Status FlagSet::Parse(int argc, char** argv, int first, std::vector<std::string>* positional) {
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      help_requested_ = true;
      return absl::OkStatus();
    }
    if (arg.size() < 3 || arg.compare(0, 2, "--") != 0) {
      if (positional == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", arg, "'"));
      }
      positional->push_back(arg);
      continue;
    }
    std::string name = arg.substr(2), value;
    bool has_value = false;
    if (const size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    const Flag* flag = Find(name);
    if (flag == nullptr && !has_value && name.compare(0, 3, "no-") == 0) {
      const Flag* negated = Find(name.substr(3));
      if (negated != nullptr && negated->is_bool) {
        if (absl::Status s = negated->set("false"); !s.ok()) return s;
        continue;
      }
    }
    if (flag == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    }
    if (!has_value) {
      if (flag->is_bool) {
        value = "true";
      } else if (i + 1 < argc) {
        value = argv[++i];
      } else {
        return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
      }
    }
    if (absl::Status s = flag->set(value); !s.ok()) return s;
  }
  return absl::OkStatus();
}

std::string FlagSet::Help() const {
  std::string out = absl::StrCat(usage_, "\n\nFlags:\n");
  for (const auto& f : flags_) {
    std::string head = absl::StrCat("  --", f.name);
    if (!f.is_bool) absl::StrAppend(&head, " VALUE");
    absl::StrAppend(&out, head);
    if (head.size() < 30) {
      out.append(30 - head.size(), ' ');
    } else {
      absl::StrAppend(&out, "\n", std::string(30, ' '));
    }
    absl::StrAppend(&out, f.help);
    if (!f.default_text.empty()) absl::StrAppend(&out, " [default: ", f.default_text, "]");
    absl::StrAppend(&out, "\n");
  }
  absl::StrAppend(&out, "  --help                      show this help\n");
  return out;
}

absl::Status ParseBytes(const std::string& text, uint64_t* out) {
  if (text.empty()) return absl::InvalidArgumentError("empty byte size");
  double multiplier = 1;
  std::string number = text;
  const char suffix = static_cast<char>(std::toupper(static_cast<unsigned char>(text.back())));
  const std::string units = "KMGT";
  if (const size_t pos = units.find(suffix); pos != std::string::npos) {
    multiplier = static_cast<double>(1ull << (10 * (pos + 1)));
    number = text.substr(0, text.size() - 1);
  } else if (suffix == 'B') {
    number = text.substr(0, text.size() - 1);
  }
  double value = 0;
  if (!absl::SimpleAtod(number, &value) || value < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", text, "' is not a byte size (examples: 4096, 64K, 512M, 2G)"));
  }
  *out = static_cast<uint64_t>(value * multiplier);
  return absl::OkStatus();
}

void ParseOrExit(FlagSet& flags, int argc, char** argv, int first, std::vector<std::string>* positional) {
  const absl::Status s = flags.Parse(argc, argv, first, positional);
  if (flags.help_requested()) {
    std::fputs(flags.Help().c_str(), stdout);
    std::exit(0);
  }
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n(see --help)\n", std::string(s.message()).c_str());
    std::exit(2);
  }
}

}  // namespace engram
