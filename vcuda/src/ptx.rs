//! What the virtual driver reads from a PTX module: each `.entry` with its parameters (size and
//! alignment, as the launch must pass them), the static shared memory it declares or uses, and
//! whether it uses dynamic (`.extern .shared`) memory. The instructions themselves are not
//! executed: each entry runs as its host-compiled twin.

use std::collections::HashMap;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub size: u32,
    pub align: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub params: Vec<Param>,
    /// Bytes of `.shared` variables declared in the entry or used by it from module scope.
    pub static_shared: u64,
    pub dynamic_shared: bool,
}

fn type_size(t: &str) -> Option<u32> {
    Some(match t {
        ".b8" | ".u8" | ".s8" | ".pred" => 1,
        ".b16" | ".u16" | ".s16" | ".f16" | ".bf16" => 2,
        ".b32" | ".u32" | ".s32" | ".f32" | ".f16x2" | ".bf16x2" => 4,
        ".b64" | ".u64" | ".s64" | ".f64" => 8,
        ".b128" => 16,
        _ => return None,
    })
}

/// A declaration's (alignment, size in bytes, name) from its tokens after the state space
/// (`.align 4 .b8 name[12]`, `.u64 .ptr .align 1 name`, `.f32 name`).
fn declaration(tokens: &[&str]) -> Result<(u32, u64, String), String> {
    let mut align = None;
    let mut elem = None;
    let mut name = None;
    let mut pointer = false;
    let mut i = 0;
    while i < tokens.len() {
        let t = tokens[i].trim_end_matches([',', ';']);
        if t == ".ptr" {
            pointer = true;
        } else if t == ".align" {
            // After `.ptr`, `.align` is the pointee's alignment, not the parameter's.
            if !pointer {
                align = tokens.get(i + 1).and_then(|a| a.trim_end_matches([',', ';']).parse::<u32>().ok());
            }
            i += 2;
            continue;
        }
        if let Some(s) = type_size(t) {
            elem = Some(s);
        } else if !t.starts_with('.') && !t.is_empty() {
            name = Some(t.to_string());
        }
        i += 1;
    }
    let elem = elem.ok_or_else(|| format!("no type in `{}`", tokens.join(" ")))?;
    let name = name.ok_or_else(|| format!("no name in `{}`", tokens.join(" ")))?;
    let (base, count) = match name.split_once('[') {
        Some((b, rest)) => {
            let n = rest.trim_end_matches(']');
            let count = if n.is_empty() {
                0
            } else {
                n.parse::<u64>().map_err(|_| format!("bad array length in `{name}`"))?
            };
            (b.to_string(), count)
        }
        None => (name.clone(), 1),
    };
    Ok((align.unwrap_or(elem), elem as u64 * count, base))
}

/// Every `.entry` of a PTX module.
pub fn entries(ptx: &str) -> Result<Vec<Entry>, String> {
    let mut module_shared: HashMap<String, u64> = HashMap::new();
    let mut out = Vec::new();
    let lines: Vec<&str> = ptx.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        if line.starts_with(".shared") || line.starts_with(".extern .shared") {
            let toks: Vec<&str> = line.split_whitespace().collect();
            let at = toks.iter().position(|t| *t == ".shared").unwrap_or(0);
            let (_, bytes, name) = declaration(&toks[at + 1..])?;
            module_shared.insert(name, if line.starts_with(".extern") { u64::MAX } else { bytes });
            i += 1;
            continue;
        }
        let Some(pos) = line.find(".entry ") else {
            i += 1;
            continue;
        };
        let header = &line[pos + ".entry ".len()..];
        let name = header.split(['(', ' ']).next().unwrap_or("").to_string();
        if name.is_empty() {
            return Err(format!("line {}: an .entry without a name", i + 1));
        }
        // Parameters: one `.param` per line until the closing parenthesis.
        let mut params = Vec::new();
        let mut j = i;
        if !header.contains(')') {
            j += 1;
            while j < lines.len() {
                let l = lines[j].trim();
                if l.starts_with(".param") {
                    let toks: Vec<&str> = l.split_whitespace().collect();
                    let (align, size, _) = declaration(&toks[1..]).map_err(|e| format!("{name}: {e}"))?;
                    params.push(Param { size: size as u32, align });
                }
                if l.starts_with(')') || l.ends_with(')') {
                    break;
                }
                j += 1;
            }
        }
        // Body: from the first `{` to its match.
        while j < lines.len() && !lines[j].contains('{') {
            j += 1;
        }
        let start = j;
        let mut depth = 0i32;
        while j < lines.len() {
            depth += lines[j].matches('{').count() as i32 - lines[j].matches('}').count() as i32;
            if depth == 0 {
                break;
            }
            j += 1;
        }
        if j >= lines.len() {
            return Err(format!("{name}: the body has no closing brace"));
        }
        let body = &lines[start..=j];
        let mut static_shared = 0;
        for l in body.iter().map(|l| l.trim()).filter(|l| l.starts_with(".shared")) {
            let toks: Vec<&str> = l.split_whitespace().collect();
            static_shared += declaration(&toks[1..]).map_err(|e| format!("{name}: {e}"))?.1;
        }
        let mut dynamic_shared = false;
        for (var, bytes) in &module_shared {
            if body.iter().any(|l| uses(l, var)) {
                if *bytes == u64::MAX {
                    dynamic_shared = true;
                } else {
                    static_shared += bytes;
                }
            }
        }
        out.push(Entry { name, params, static_shared, dynamic_shared });
        i = j + 1;
    }
    Ok(out)
}

/// Whether `line` names `var` as a whole token.
fn uses(line: &str, var: &str) -> bool {
    line.match_indices(var).any(|(at, _)| {
        let before = line[..at].chars().next_back();
        let after = line[at + var.len()..].chars().next();
        let ident = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
        !ident(before) && !ident(after)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PTX: &str = r#"
.version 9.0
.target sm_80
.address_size 64

.extern .shared .align 16 .b8 shared[];
.shared .align 8 .b8 _ZZ4sumE9warp_sums[256];

.visible .entry one(
	.param .u64 .ptr .align 1 one_param_0,
	.param .f32 one_param_1,
	.param .align 4 .b8 one_param_2[12],
	.param .u32 one_param_3
)
{
	.shared .align 4 .b8 _ZZ3fooE2ks[8448];
	ld.param.u64 	%rd1, [one_param_0];
	mov.u32 	%r1, shared;
}

.visible .entry two()
{
	mov.u64 	%rd1, _ZZ4sumE9warp_sums;
	ret;
}
"#;

    #[test]
    fn entries_parameters_and_shared_memory() {
        let e = entries(PTX).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].name, "one");
        assert_eq!(
            e[0].params,
            vec![
                Param { size: 8, align: 8 },
                Param { size: 4, align: 4 },
                Param { size: 12, align: 4 },
                Param { size: 4, align: 4 }
            ]
        );
        assert_eq!(e[0].static_shared, 8448);
        assert!(e[0].dynamic_shared);
        assert_eq!(e[1].name, "two");
        assert!(e[1].params.is_empty());
        assert_eq!(e[1].static_shared, 256);
        assert!(!e[1].dynamic_shared);
    }

    #[test]
    fn unbalanced_body_is_an_error() {
        assert!(entries(".visible .entry x()\n{\n ret;\n").unwrap_err().contains("closing brace"));
    }
}
