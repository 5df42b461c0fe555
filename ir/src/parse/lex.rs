//! Tokens of the text form, produced on demand so that a full print of a large
//! model (millions of weights) is read without holding a token per weight.

/// What a token is; words borrow from the source text.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Tok<'a> {
    /// A line break outside brackets: the text form is line-oriented.
    Newline,
    /// Identifiers, keywords and numbers alike (`conv`, `f32`, `-0.5`, `0x7fc00001`, `inf`).
    Word(&'a str),
    /// A double-quoted string, escapes resolved.
    Str(String),
    /// `%N`
    Value(u32),
    /// `@N`
    Const(u32),
    Punct(char),
    Eof,
}

#[derive(Clone, Debug)]
pub(super) struct Token<'a> {
    pub tok: Tok<'a>,
    /// Byte offset of the token's first character (for error positions).
    pub at: usize,
}

/// A lexing failure at a byte offset.
pub(super) struct LexError {
    pub at: usize,
    pub message: String,
}

pub(super) struct Lexer<'a> {
    text: &'a str,
    pos: usize,
    /// Open brackets: newlines inside them are plain whitespace.
    depth: usize,
}

impl<'a> Lexer<'a> {
    pub fn new(text: &'a str) -> Self {
        Lexer { text, pos: 0, depth: 0 }
    }

    fn peek_char(&self) -> Option<char> {
        self.text[self.pos..].chars().next()
    }

    fn char_after(&self, offset: usize) -> Option<char> {
        self.text[self.pos..].chars().nth(offset)
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek_char()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    pub fn next_token(&mut self) -> Result<Token<'a>, LexError> {
        loop {
            let at = self.pos;
            let Some(c) = self.peek_char() else {
                return Ok(Token { tok: Tok::Eof, at });
            };
            match c {
                '\n' => {
                    self.bump();
                    if self.depth == 0 {
                        return Ok(Token { tok: Tok::Newline, at });
                    }
                }
                c if c.is_whitespace() => {
                    self.bump();
                }
                '#' => {
                    while self.peek_char().is_some_and(|c| c != '\n') {
                        self.bump();
                    }
                }
                '"' => return self.string(at),
                '%' | '@' => {
                    self.bump();
                    let id = self.id_number(at, c)?;
                    let tok = if c == '%' { Tok::Value(id) } else { Tok::Const(id) };
                    return Ok(Token { tok, at });
                }
                c if starts_word(c, self.char_after(1)) => return Ok(Token { tok: Tok::Word(self.word()), at }),
                _ => {
                    self.bump();
                    match c {
                        '[' | '(' | '{' => self.depth += 1,
                        ']' | ')' | '}' => self.depth = self.depth.saturating_sub(1),
                        _ => {}
                    }
                    return Ok(Token { tok: Tok::Punct(c), at });
                }
            }
        }
    }

    fn id_number(&mut self, at: usize, sigil: char) -> Result<u32, LexError> {
        let start = self.pos;
        while self.peek_char().is_some_and(|c| c.is_ascii_digit()) {
            self.bump();
        }
        let digits = &self.text[start..self.pos];
        if digits.is_empty() {
            return Err(LexError { at, message: format!("expected a number after `{sigil}`") });
        }
        digits
            .parse()
            .map_err(|_| LexError { at, message: format!("id `{sigil}{digits}` is too large") })
    }

    /// A run of letters, digits, `_` and `.`, with a leading `-` and an exponent sign
    /// allowed, so that every float `{:?}` prints is one word.
    fn word(&mut self) -> &'a str {
        let start = self.pos;
        self.bump();
        loop {
            let so_far = &self.text[start..self.pos];
            let is_hex = so_far.starts_with("0x") || so_far.starts_with("-0x");
            match self.peek_char() {
                Some(c) if c.is_ascii_alphanumeric() || c == '_' || c == '.' => {}
                Some('+' | '-') if !is_hex && so_far.ends_with(['e', 'E']) && starts_numeric(so_far) => {}
                _ => break,
            }
            self.bump();
        }
        &self.text[start..self.pos]
    }

    fn string(&mut self, at: usize) -> Result<Token<'a>, LexError> {
        self.bump();
        let mut s = String::new();
        loop {
            let escape_at = self.pos;
            match self.bump() {
                None | Some('\n') => return Err(LexError { at, message: "unterminated string".into() }),
                Some('"') => return Ok(Token { tok: Tok::Str(s), at }),
                Some('\\') => match self.bump() {
                    Some('"') => s.push('"'),
                    Some('\\') => s.push('\\'),
                    Some('n') => s.push('\n'),
                    Some('t') => s.push('\t'),
                    Some('r') => s.push('\r'),
                    Some('u') => s.push(self.unicode_escape(escape_at)?),
                    Some(c) => {
                        return Err(LexError { at: escape_at, message: format!("unknown escape `\\{c}` in string") });
                    }
                    None => return Err(LexError { at, message: "unterminated string".into() }),
                },
                Some(c) => s.push(c),
            }
        }
    }

    /// `\u{HEX}` after the `\u`.
    fn unicode_escape(&mut self, at: usize) -> Result<char, LexError> {
        let bad = || LexError { at, message: "malformed `\\u{...}` escape in string".into() };
        if self.bump() != Some('{') {
            return Err(bad());
        }
        let start = self.pos;
        while self.peek_char().is_some_and(|c| c.is_ascii_hexdigit()) {
            self.bump();
        }
        let hex = &self.text[start..self.pos];
        if self.bump() != Some('}') || hex.is_empty() || hex.len() > 6 {
            return Err(bad());
        }
        u32::from_str_radix(hex, 16).ok().and_then(char::from_u32).ok_or_else(bad)
    }
}

fn starts_word(c: char, next: Option<char>) -> bool {
    let word_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
    word_char(c) || (c == '-' && next.is_some_and(word_char))
}

fn starts_numeric(word: &str) -> bool {
    let digits = word.strip_prefix('-').unwrap_or(word);
    digits.starts_with(|c: char| c.is_ascii_digit() || c == '.')
}

/// 1-based line and column (in characters) of a byte offset.
pub(super) fn line_column(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}
