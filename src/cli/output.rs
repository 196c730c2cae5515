//! How the read commands print: aligned columns for people, JSON or YAML for tools.

use clap::ValueEnum;

/// How a read command prints what it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    #[default]
    Table,
    /// JSON, one document.
    Json,
    /// YAML, one document.
    Yaml,
}

impl Output {
    /// Writes `value` as JSON or YAML; `false` (nothing written) for a table, which the
    /// caller draws with [`write_table`].
    pub fn write_structured(
        self,
        value: &(impl serde::Serialize + ?Sized),
        out: &mut impl std::io::Write,
    ) -> anyhow::Result<bool> {
        match self {
            Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(value)?)?,
            Output::Yaml => write!(out, "{}", serde_norway::to_string(value)?)?,
            Output::Table => return Ok(false),
        }
        Ok(true)
    }
}

/// Writes `header` and `rows` in columns as wide as their widest cell (in characters), two
/// spaces apart, with no spaces at the ends of the lines.
pub fn write_table<const N: usize>(
    header: [&str; N],
    rows: &[[String; N]],
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; N]| {
        let mut line = String::new();
        for (cell, width) in cells.iter().zip(widths) {
            line.push_str(&format!("{cell:<width$}  "));
        }
        line.trim_end().to_string()
    };
    writeln!(out, "{}", line(header))?;
    for row in rows {
        writeln!(out, "{}", line(row.each_ref().map(String::as_str)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_by_characters_and_lines_have_no_trailing_spaces() {
        let mut out = Vec::new();
        let rows = [
            ["é".to_string(), "x".to_string(), String::new()],
            ["abc".to_string(), "yy".to_string(), "z".to_string()],
        ];
        write_table(["A", "B", "C"], &rows, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "A    B   C\n\
             é    x\n\
             abc  yy  z\n"
        );
    }

    #[test]
    fn a_table_is_left_to_the_caller() {
        let mut out = Vec::new();
        assert!(!Output::Table.write_structured(&[1], &mut out).unwrap());
        assert!(out.is_empty());
        assert!(Output::Json.write_structured(&[1], &mut out).unwrap());
        assert_eq!(String::from_utf8(out).unwrap(), "[\n  1\n]\n");
    }
}
